"""Which base model an adapter was trained on: the name or path it was loaded from and a fingerprint of its
weights, recorded in adapter_config.json by save_adapter and checked by load_adapter.

The fingerprint is a SHA-256 over every base tensor's name, shape and 64 values at evenly spaced positions
(as fp32), taken when the model is built or loaded, before any training or bf16 storage changes them. That
costs microseconds even for gpt2-xl, and two checkpoints of the same shape (gpt2 and a fine-tuned gpt2, or two
random seeds) get different fingerprints unless their weights agree at every sampled position.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Optional

import torch
from torch import nn

SAMPLES_PER_TENSOR = 64


def weights_fingerprint(module: nn.Module) -> Optional[str]:
    """The fingerprint of `module`'s current parameters and buffers (None on the meta device, which holds no
    values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        if tensor.is_meta:
            return None
        flat = tensor.detach().reshape(-1)
        count = min(SAMPLES_PER_TENSOR, flat.numel())
        positions = torch.arange(count, dtype=torch.long) * max(flat.numel() - 1, 0) // max(count - 1, 1)  # exact
        sample = flat[positions.to(flat.device)].float().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:32]


def record_base(module: nn.Module, name_or_path: Optional[str]) -> None:
    """Stores what `module` (a GPT2Model just built or loaded) is, for the adapters trained on it."""
    module.base_identity = {"name_or_path": name_or_path, "fingerprint": weights_fingerprint(module)}


def base_identity(module: nn.Module) -> dict:
    return dict(getattr(module, "base_identity", None) or {"name_or_path": None, "fingerprint": None})


def describe(identity: dict) -> str:
    name = identity.get("name_or_path") or "a model built in code"
    fingerprint = identity.get("fingerprint")
    return f"{name} (weights fingerprint {fingerprint[:12] if fingerprint else 'unknown'})"


def check_same_base(recorded: Optional[dict], module: nn.Module, where: str, allow_other_base: bool) -> None:
    """Refuses (ValueError) to load an adapter trained on other base weights than `module`'s; with
    `allow_other_base` it only warns. An adapter written before bases were recorded, or a base whose weights
    are unknown, is not checked."""
    ours = base_identity(module)
    if not recorded or not recorded.get("fingerprint") or not ours["fingerprint"]:
        return
    if recorded["fingerprint"] == ours["fingerprint"]:
        return
    message = (f"{where}: adapter was trained on {describe(recorded)}, but this model is {describe(ours)}: "
               "other weights of the same shape")
    if allow_other_base:
        warnings.warn(message + "; loading it anyway (allow_other_base)", stacklevel=3)
        return
    raise ValueError(message + "; load the base it was trained on, or pass allow_other_base=True "
                     "(--allow-other-base on the command line) to load it anyway")
