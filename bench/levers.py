"""Measures candidate speed-ups of our model code without changing it: each variant patches a fresh copy of
the model in this process only, and all variants are timed round-robin (the fastest step of each is
reported, since load from other processes only ever slows a step down).

    python bench/levers.py forward            # inference at the machine's precision, 8 x 128
    python bench/levers.py step --method lora # training step, 8 x 64
    python bench/levers.py generate           # 128 new tokens, batch 1

The findings are summarised in bench/README.md ("Profile" and "Levers").
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import ours  # noqa: E402


# ---------------------------------------------------------------------------------------- patches
def flat_addmm_linears(model: nn.Module) -> None:
    """Every frozen nn.Linear computes addmm(bias, x as 2-D, W^T stored contiguous): the layout transformers'
    Conv1D uses, instead of F.linear on a 3-D input."""
    for module in model.modules():
        if type(module) is nn.Linear and not module.weight.requires_grad:
            module.weight_t = module.weight.detach().t().contiguous()

            def forward(self, x):
                flat = x.reshape(-1, x.shape[-1]).to(self.weight_t.dtype)
                out = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias.to(flat.dtype), flat, self.weight_t)
                return out.view(*x.shape[:-1], out.shape[-1])

            module.forward = types.MethodType(forward, module)


def flat_linears(model: nn.Module) -> None:
    """F.linear on the input flattened to 2-D (same weights, no transposed copy)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            def forward(self, x):
                out = F.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
                return out.view(*x.shape[:-1], out.shape[-1])

            module.forward = types.MethodType(forward, module)


ROW_CHUNK = 512


def row_chunked_linears(model: nn.Module, only_to_width: bool = False) -> None:
    """F.linear over at most ROW_CHUNK rows at a time (`only_to_width`: only the projections back to the model's
    width, the attention's and the FFN's output ones). On the AMX Xeon, oneDNN runs the projections to 768
    outputs at about half speed from ~768 to ~1,280 rows (the forward case has 1,024) and the wider ones at full
    speed: each row's output is the same product, only the kernel oneDNN picks changes."""
    width = getattr(getattr(model, "config", None), "n_embd", None)
    for module in model.modules():
        if type(module) is nn.Linear and (not only_to_width or module.out_features == width):
            def forward(self, x):
                flat = x.reshape(-1, x.shape[-1])
                out = torch.cat([F.linear(rows, self.weight, self.bias) for rows in flat.split(ROW_CHUNK)])
                return out.view(*x.shape[:-1], out.shape[-1])

            module.forward = types.MethodType(forward, module)


def no_dropout(model: nn.Module) -> None:
    """Dropout off in the frozen base (attention-probability dropout also forces SDPA off its fused kernel)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0


def prefix_without_grad(model: nn.Module) -> None:
    """For interventions at the last position only: every earlier position is untouched by them (causal
    attention), so it runs once under no_grad into a KV cache and only the last token runs with autograd.
    The backward pass then covers one token per row instead of all of them. (Rows end at the last column
    here; with right padding the split would be per row.)"""
    from modules.kv_cache import KVCache

    class PrefixCache(KVCache):
        """Once the prefix is in, later chunks concatenate instead of writing in place: one buffer shared by
        all layers, written under autograd, would invalidate the tensors earlier layers saved."""
        frozen = False

        def update(self, layer_idx, keys, values):
            if not self.frozen:
                return super().update(layer_idx, keys, values)
            return (torch.cat([self.keys[layer_idx, :, :, :self.length], keys], dim=2),
                    torch.cat([self.values[layer_idx, :, :, :self.length], values], dim=2))

    full_forward = model.forward

    def forward(input_ids, attention_mask=None, cache=None, prompt_mask=None):
        if cache is not None or not torch.is_grad_enabled():
            return full_forward(input_ids, attention_mask, cache, prompt_mask)
        batch, length = input_ids.shape
        cache = PrefixCache.for_model(model.config, batch, length)
        with torch.no_grad():
            full_forward(input_ids[:, :-1], None, cache, torch.zeros_like(input_ids[:, :-1], dtype=torch.bool))
        cache.frozen = True
        return full_forward(input_ids[:, -1:], None, cache, torch.ones_like(input_ids[:, -1:], dtype=torch.bool))

    model.forward = forward


def compiled(model: nn.Module) -> None:
    model.forward = torch.compile(model.forward, dynamic=False)


PATCHES = {
    "as-is": [],
    "flat-linear": [flat_linears],
    "row-chunks": [row_chunked_linears],
    "row-chunks-to-width": [lambda model: row_chunked_linears(model, only_to_width=True)],
    "addmm-Wt": [flat_addmm_linears],
    "no-dropout": [no_dropout],
    "addmm-Wt+no-dropout": [flat_addmm_linears, no_dropout],
    "compile": [compiled],
    "prefix-no-grad": [prefix_without_grad],
    "prefix-no-grad+no-dropout": [prefix_without_grad, no_dropout],
}


# ---------------------------------------------------------------------------------------- workloads
def build(workload: str, weights: str, patches, method: str, batch: int) -> common.Case:
    original = ours.load_model

    def patched_load(path):
        model = original(path)
        model._pending_patches = patches
        return model

    # Cases build and configure their model themselves; the patches must come after set_precision / apply_method,
    # so they are applied on the first step.
    ours.load_model = patched_load
    try:
        if workload == "forward":
            case = ours.forward_case(weights, ours.best_precision())
        elif workload == "generate":
            case = ours.generate_case(weights, ours.best_precision(), batch)
        else:
            case = ours.train_step_case(weights, method, precision=ours.best_precision())
    finally:
        ours.load_model = original
    return case


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=["forward", "generate", "step"])
    parser.add_argument("--method", default="lora")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", default="as-is,flat-linear,addmm-Wt,no-dropout,addmm-Wt+no-dropout",
                        help=f"comma-separated among {', '.join(PATCHES)}")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    common.set_threads(args.threads)
    cases = {}
    with tempfile.TemporaryDirectory() as weights:
        ours.export_weights(weights)
        for name in args.variants.split(","):
            cases[name] = build(args.workload, weights, PATCHES[name], args.method, args.batch)
    patch_models(cases)
    for case in cases.values():
        case.step()
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():
            start = time.perf_counter()
            units = case.step()
            times[name].append(time.perf_counter() - start)
    base = min(times[next(iter(times))])
    for name, values in times.items():
        print(f"{name:<24} best {min(values):.3f} s  ({units / min(values):8.1f} units/s, x{base / min(values):.2f})"
              f"  median {sorted(values)[len(values) // 2]:.3f} s")


def patch_models(cases: dict) -> None:
    """Finds each case's model through its step closure and applies the pending patches."""
    for case in cases.values():
        for cell in case.step.__closure__ or ():
            value = cell.cell_contents
            if isinstance(value, nn.Module) and hasattr(value, "_pending_patches"):
                for patch in value._pending_patches:
                    patch(value)


if __name__ == "__main__":
    main()
