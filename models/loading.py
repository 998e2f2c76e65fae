"""Reading GPT-2 checkpoints in the Hugging Face layouts and mapping them onto our module names.

A checkpoint is a directory with `config.json` and `model.safetensors` or `pytorch_model.bin` (a local
folder, or the hub's `gpt2` files fetched into the hub cache). Our module names mirror the checkpoint's,
so the mapping only strips an optional `transformer.` prefix, drops non-weight buffers and transposes
the four Conv1D matrices, which the checkpoint stores as (in, out).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import torch

from models.config import GPT2Config
from models.hub import HUB_REPOS, hub_download

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
CONV1D_SUFFIXES = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Causal-mask buffers that old checkpoints saved alongside the weights.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # leading dots: c_attn.bias is a weight


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, wrong format, or not matching the model."""


def locate_checkpoint(name_or_path: str | os.PathLike) -> tuple[Path, Path]:
    """Returns (config.json, weights file) for a local directory, a weights file, or a hub name."""
    path = Path(name_or_path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{path}: no config.json in this checkpoint directory")
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return config, path / name
        raise CheckpointError(f"{path}: no weights file; expected one of {', '.join(WEIGHT_FILES)}")
    if path.is_file():
        config = path.parent / "config.json"
        if not config.is_file():
            raise CheckpointError(f"{path}: weights given as a file, but no config.json beside it")
        return config, path
    if str(name_or_path) in HUB_REPOS:
        config = hub_download(str(name_or_path), "config.json")
        return config, hub_download(str(name_or_path), "model.safetensors")
    raise CheckpointError(
        f"{name_or_path!r} is not a checkpoint directory, a weights file, or a known model name "
        f"({', '.join(HUB_REPOS)}; or random:<size> for random weights)"
    )


def read_config(path: Path) -> GPT2Config:
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the model config ({error})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    try:
        return GPT2Config.from_hf_dict(raw, source=str(path))
    except (TypeError, ValueError) as error:
        raise CheckpointError(str(error)) from None


def load_torch_file(path: Path):
    """torch.load with weights_only=True (a file must not run code), every way it can fail as a CheckpointError
    naming the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, IndexError,
            struct.error) as error:  # IndexError and struct.error: a truncated file in torch's legacy format
        # torch names the global as "Unsupported global: GLOBAL x.y", or "unsupported GLOBAL x.y whose module x is blocked"
        unsupported = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", str(error))
        if unsupported:  # a class or function the file asks for: other Python objects, or a name cut short
            raise CheckpointError(
                f"{path}: refused: it asks for {unsupported.group(1)}, which is not a tensor type allowed with "
                "weights_only=True (a file holding other Python objects, or a damaged one); save a plain state dict "
                "or safetensors instead"
            ) from None
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{path}: cannot load this PyTorch file, truncated or corrupt ({reason})") from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Reads safetensors or a pickled .bin (with weights_only=True: a checkpoint must not run code)."""
    path = Path(path)
    with open(path, "rb") as file:
        head = file.read(8)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file, truncated or corrupt ({error})") from None
    if not head.startswith(b"PK") and not head.startswith(b"\x80"):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    state = load_torch_file(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat mapping of tensor names to tensors")
    return state


def hf_to_ours(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Renames/transposes a Hugging Face GPT-2 state dict into GPT2Model's names and layouts."""
    ours = {}
    for name, tensor in state.items():
        if name.startswith("transformer."):
            name = name[len("transformer."):]
        if name.endswith(BUFFER_SUFFIXES):
            continue
        if name == "lm_head.weight":
            continue  # tied to wte; the copy in GPT2LMHeadModel files carries no extra information
        if name.endswith(CONV1D_SUFFIXES):
            if tensor.dim() != 2:
                raise CheckpointError(f"{source}: {name} should be a matrix, has shape {tuple(tensor.shape)}")
            tensor = tensor.t()
        ours[name] = tensor.contiguous()
    return ours


def ours_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of hf_to_ours, for saving in the hub's layout (no prefix, Conv1D as (in, out))."""
    return {name: (t.t() if name.endswith(CONV1D_SUFFIXES) else t).contiguous() for name, t in state.items()}


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], source: str) -> None:
    """Raises one error that lists every missing, unexpected and wrongly shaped tensor by name."""
    problems = []
    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    if missing:
        problems.append(f"missing tensors: {describe_names(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {describe_names(unexpected)}")
    for name in expected.keys() & found.keys():
        if expected[name].shape != found[name].shape:
            # Report in the checkpoint's own layout, where Conv1D matrices are (in, out).
            want, got = expected[name].shape, found[name].shape
            if name.endswith(CONV1D_SUFFIXES):
                want, got = want[::-1], got[::-1]
            problems.append(f"{name} has shape {tuple(got)}, the model expects {tuple(want)}")
    if problems:
        raise CheckpointError(f"{source} does not fit this GPT-2 model: " + "; ".join(sorted(problems)))


def describe_names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


