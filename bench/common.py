"""What both sides of the benchmark share: the workloads (shapes, seeds, inputs), the worker protocol that
bench/run.py drives, timing, FLOP counting and the machine description.

This file is imported by bench/ours.py (project venv) and bench/peers.py (bench/.venv-peers), so it uses
only the standard library and torch.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------- workloads
FORWARD_SHAPE = (8, 128)  # batch x tokens, forward throughput
STEP_SHAPE = (8, 64)  # batch x tokens, one training step
PROMPT_LENGTH, NEW_TOKENS = 32, 128  # generation
NUM_LABELS = 5  # the SST head
LEARNING_RATE = 1e-4
LORA_RANK, LORA_ALPHA = 8, 16.0
VIRTUAL_TOKENS = 20  # prompt, ptuning and prefix: peft's and our default
LOREFT_RANK = 4  # every ReFT-family case: rank 4, each layer's block output, the last position (pyreft's setting)
# The ReFT-family step cases and pyreft's intervention class for each (pyreft.<Name>Intervention).
REFT_INTERVENTIONS = {"loreft": "Loreft", "noreft": "Noreft", "consreft": "Consreft", "lobireft": "Lobireft",
                      "direft": "Direft", "nodireft": "Nodireft"}
VOCAB_SIZE = 50257
EOS_TOKEN_ID = 50256
SEED = 1234

# GEMM shapes (m, k, n) for the matmul peak: the FFN and attention projections of gpt2 at batch 8 x 128 and
# larger, so the peak is what the model's own matmuls could reach at best.
PEAK_SHAPES = ((1024, 768, 3072), (4096, 768, 3072), (2048, 3072, 768), (1024, 768, 2304))


def token_batch(batch: int, length: int, seed: int = SEED) -> torch.Tensor:
    """The same token ids on both sides: a seeded CPU generator gives the same draws for the same torch."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, EOS_TOKEN_ID, (batch, length), generator=generator)


def label_batch(batch: int, seed: int = SEED) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, NUM_LABELS, (batch,), generator=generator)


def forward_flops(n_layer: int, d: int, batch: int, length: int, vocab: int = 0) -> int:
    """Matmul FLOPs of one forward pass, the usual accounting (multiply-add = 2 FLOPs):

    per token and layer, the projections qkv (d x 3d), out (d x d), FFN (d x 4d, 4d x d) cost 2 * 12 d^2;
    attention scores and the weighted sum cost 2 * 2 * T * d per token (the full T x T square, as if
    not causal: that is what the dense kernel computes); `vocab` > 0 adds the LM head, 2 * d * V per token.
    LayerNorm, GELU, softmax and the residual adds are ignored (well under 1%).
    """
    per_token = n_layer * (24 * d * d + 4 * length * d) + 2 * d * vocab
    return batch * length * per_token


def train_step_flops(n_layer: int, d: int, batch: int, length: int, weight_grads: bool) -> int:
    """A training step as 2x (activation gradients) or 3x (plus weight gradients) the forward pass."""
    return (3 if weight_grads else 2) * forward_flops(n_layer, d, batch, length)


# ---------------------------------------------------------------------------------------- timing
def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before the first parallel work; harmless if already set
        pass


def matmul_peak(dtype: torch.dtype, shapes=PEAK_SHAPES, repeats: int = 5) -> dict:
    """Best GEMM throughput over `shapes`: the ceiling the model's matmuls are compared to."""
    best, per_shape = 0.0, {}
    generator = torch.Generator().manual_seed(SEED)
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=generator).to(dtype)
        b = torch.randn(k, n, generator=generator).to(dtype)
        out = torch.empty(m, n, dtype=dtype)
        for _ in range(2):
            torch.mm(a, b, out=out)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - start)
        flops = 2 * m * k * n / min(times)
        per_shape[f"{m}x{k}x{n}"] = flops
        best = max(best, flops)
    return {"flops_per_s": best, "per_shape": per_shape}


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict:
    """Best copy throughput (bytes read + written per second) of a buffer far larger than the caches: the
    ceiling for work that streams every weight once per step, as decoding one token at batch 1 does."""
    source = torch.ones(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    target.copy_(source)
    best = min(_timed(lambda: target.copy_(source)) for _ in range(repeats))
    return {"bytes_per_s": 2 * source.numel() * 4 / best}


def gemv_stream(dtype_name: str = "bfloat16", repeats: int = 5) -> dict:
    """Bytes/s that matrix-vector products stream out of memory: one batch-1 decoding step's matmuls over the
    gpt2 block weights (48 matrices, 170 MB in bf16, far beyond the caches). Decoding one token can go no
    faster than reading every weight at this rate."""
    dtype = getattr(torch, dtype_name)
    generator = torch.Generator().manual_seed(SEED)
    shapes = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12
    weights = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    inputs = {n: torch.randn(1, n, generator=generator).to(dtype) for n in (768, 3072)}

    def one_token():
        for weight in weights:
            torch.nn.functional.linear(inputs[weight.shape[1]], weight)

    one_token()
    best = min(_timed(one_token) for _ in range(repeats))
    return {"bytes_per_s": sum(w.numel() * w.element_size() for w in weights) / best, "dtype": dtype_name}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_bytes() -> int:
    """This process's high-water resident memory (VmHWM)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def machine_description() -> dict:
    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    cpu_model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    memory = None
    try:
        with open("/proc/meminfo") as info:
            memory = int(info.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    interesting = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8", "fma")
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_flags": {flag: flag in flags for flag in interesting},
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------- the worker protocol
@dataclass
class Case:
    """One measurement, set up once: `step()` does one timed unit of work and returns how many units (tokens)
    it processed; `info` is reported back once (parameter counts, output samples for cross-checks, ...)."""

    step: Callable[[], int]
    info: dict


def worker_main(cases: dict, description: str) -> None:
    """The command line of a worker (bench/ours.py, bench/peers.py), started by bench/run.py."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--worker", action="store_true", required=True)
    parser.add_argument("--threads", type=int, default=2)
    serve(cases, parser.parse_args().threads)


def serve(cases: dict, threads: int) -> None:
    """Answers bench/run.py on a private copy of stdout, one JSON object per line, so that whatever the
    libraries print cannot corrupt the protocol (their stdout goes to stderr instead).

    Requests: {"op": "setup", "case": name, "warmup": n, "options": {...}} -> {"ok", "info"}
              {"op": "run"} -> {"ok", "seconds", "units"}  (one timed step of the current case)
              {"op": "call", "name": name, "options": {...}} -> {"ok", "result"}  (an untimed helper)
              {"op": "exit"}
    """
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    set_threads(threads)
    current = None

    def answer(payload):
        protocol.write(json.dumps(payload) + "\n")

    for line in sys.stdin:
        request = json.loads(line)
        try:
            op = request["op"]
            if op == "exit":
                break
            if op == "setup":
                current = None  # release the previous case's model before building the next
                current = cases[request["case"]](**request.get("options", {}))
                for _ in range(request.get("warmup", 1)):
                    current.step()
                answer({"ok": True, "info": current.info, "peak_rss_bytes": peak_rss_bytes()})
            elif op == "run":
                if current is None:
                    raise RuntimeError("'run' before any 'setup'")
                start = time.perf_counter()
                units = current.step()
                answer({"ok": True, "seconds": time.perf_counter() - start, "units": units})
            elif op == "call":
                answer({"ok": True, "result": cases[request["name"]](**request.get("options", {}))})
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception:  # reported to run.py, which records the case as failed and goes on
            current = None
            answer({"ok": False, "error": traceback.format_exc()})
