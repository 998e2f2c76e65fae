"""Our side of the benchmark: a worker that bench/run.py drives (see common.serve), in the project venv.

    python bench/ours.py --worker --threads 2
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: models/, modules/

import common  # noqa: E402  (bench/ is sys.path[0] when this file is run)
from models.generation import SamplingConfig, generate  # noqa: E402
from models.gpt2 import GPT2Model, resolve_precision  # noqa: E402


def load_model(weights: str) -> GPT2Model:
    return GPT2Model.from_pretrained(weights)


def export_weights(directory: str) -> dict:
    """Random gpt2-shaped weights, saved in the hub layout so that the peers load the very same model."""
    torch.manual_seed(common.SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random weights": that is the point here
        model = GPT2Model.from_pretrained("random:gpt2")
    model.save_pretrained(directory)
    return {"parameters": sum(p.numel() for p in model.parameters())}


def sample(tensor: torch.Tensor) -> list[float]:
    """A few output values, for run.py to check that both sides computed the same thing."""
    return tensor[0, -1, :8].float().tolist()


def forward_case(weights: str, precision: str) -> common.Case:
    """Inference as a user should run it: every weight frozen, so bf16 stores them in bf16 once."""
    model = load_model(weights).requires_grad_(False).set_precision(precision)
    ids = common.token_batch(*common.FORWARD_SHAPE)

    def step():
        with torch.inference_mode():
            model(ids)
        return ids.numel()

    with torch.inference_mode():
        out = model(ids)["last_hidden_state"]
    return common.Case(step, {"output_sample": sample(out), "precision": precision})


def generate_case(weights: str, precision: str, batch: int) -> common.Case:
    model = load_model(weights).requires_grad_(False).set_precision(precision)
    prompts = common.token_batch(batch, common.PROMPT_LENGTH).tolist()
    sampling = SamplingConfig(max_new_tokens=common.NEW_TOKENS, do_sample=False)
    produced = []

    def step():
        produced[:] = generate(model, prompts, sampling, pad_token_id=common.EOS_TOKEN_ID)
        return sum(len(row) for row in produced)

    step()
    return common.Case(step, {"first_tokens": produced[0][:16], "precision": precision})


def make_optimizer(params):
    """The project's AdamW once modules/optimizer.py exists; torch's until then (reported in the results)."""
    try:
        from modules.optimizer import AdamW
        name = "modules.optimizer.AdamW"
    except ImportError:
        from torch.optim import AdamW
        name = "torch.optim.AdamW (modules/optimizer.py not present)"
    return AdamW(params, lr=common.LEARNING_RATE, weight_decay=0.0), name


def method_config(method: str):
    from models.peft import MethodConfig

    if method == "lora":
        # peft puts one rank-8 update on the fused c_attn; ours covers the same q|k|v output with one per part.
        return MethodConfig("lora", rank=common.LORA_RANK, alpha=common.LORA_ALPHA, targets=("query", "key", "value"))
    if method in ("lora_c_attn", "dora"):
        # Like for like with peft: one rank-8 update on the fused c_attn (DoRA: with its magnitudes).
        return MethodConfig("lora" if method == "lora_c_attn" else "dora", rank=common.LORA_RANK, alpha=common.LORA_ALPHA,
                            targets=("c_attn",))
    if method == "ia3":
        return MethodConfig("ia3", ia3_targets=("c_attn", "ffn"))  # peft's GPT-2 default
    if method in ("prompt", "ptuning", "prefix"):
        return MethodConfig(method, num_virtual_tokens=common.VIRTUAL_TOKENS)  # ptuning: an MLP as wide as the model
    if method in common.REFT_INTERVENTIONS:
        # pyreft's setting: every layer's block output, the last position, rank 4.
        return MethodConfig(method, rank=common.LOREFT_RANK, positions="l1", components=("ffn",))
    return MethodConfig(method)


def best_precision() -> str:
    """What `--precision auto` picks on this machine: bf16 only where the CPU has bf16 instructions."""
    return resolve_precision("auto", torch.device("cpu"))


def train_step_case(weights: str, method: str, plain: bool = False, precision: str = "bf16") -> common.Case:
    """One step of sentiment training as the trainer runs it: the task's LastTokenClassifier (GPT-2 + a Linear head
    on the last token; the model picks its cheaper last-token path where that is exact), `precision`, our AdamW.
    `plain` reads the last token off the full forward pass instead, to measure what that path saves."""
    from models.peft import apply_method, parameter_summary
    from tasks.classification import LastTokenClassifier

    gpt = load_model(weights)
    apply_method(gpt, method_config(method))
    model = LastTokenClassifier(gpt, common.NUM_LABELS)
    gpt.set_precision(precision)
    model.train()
    forward = (lambda ids, mask: model.head(gpt(ids, mask)["last_token"].float())) if plain else model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_name = make_optimizer(params)
    ids = common.token_batch(*common.STEP_SHAPE)
    labels = common.label_batch(common.STEP_SHAPE[0])
    mask = torch.ones_like(ids)

    def step():
        F.cross_entropy(forward(ids, mask), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return ids.numel()

    # Every trainable parameter (the method's and the head's) must get a gradient, as on the peers' side.
    F.cross_entropy(forward(ids, mask), labels).backward()
    without_gradient = sum(p.numel() for p in params if p.grad is None)
    optimizer.zero_grad(set_to_none=True)
    head_parameters = sum(p.numel() for p in model.head.parameters())
    suffix = gpt.trainable_suffix_length()
    return common.Case(step, {
        "parameters_without_gradient": without_gradient,
        "method": method_config(method).to_dict(),
        "last_token_path": "plain" if plain or suffix is None else f"gradients for the last {suffix} tokens only",
        "trainable_parameters": sum(p.numel() for p in params),
        "head_parameters": head_parameters,
        "total_parameters": parameter_summary(gpt)["total"] + head_parameters,
        "optimizer": optimizer_name,
        "precision": precision,
    })


def matmul_peak(dtype: str) -> dict:
    return common.matmul_peak(getattr(torch, dtype))


CASES = {
    "export_weights": export_weights,
    "forward": forward_case,
    "generate": generate_case,
    "train_step": train_step_case,
    "matmul_peak": matmul_peak,
    "memory_bandwidth": common.memory_bandwidth,
    "gemv_stream": common.gemv_stream,
    "machine": common.machine_description,
    "best_precision": best_precision,
}

if __name__ == "__main__":
    common.worker_main(CASES, __doc__)
