"""The resume checkpoint (<run>/last/checkpoint.pt) and the run directory's guard against silent overwrites.

The checkpoint holds what an interrupted run needs to continue exactly where it stopped: the trainable
tensors, the optimizer and scheduler state, every rank's RNG state, the position in the epoch, the best dev
metric so far and the log. It is written atomically and read with `weights_only=True` (a checkpoint must not
be able to run code). The best model itself is saved separately, as an adapter (<run>/best/).
"""
from __future__ import annotations

import shutil
from pathlib import Path
import torch

from data.atomic import atomic_save
from models.loading import CheckpointError, load_torch_file

CHECKPOINT_FORMAT = "gpt2-peft-training-checkpoint"
RUN_FILES = ("log.json", "best", "last")


class ResumeError(ValueError):
    """A checkpoint that cannot continue this run: missing, unreadable, or made by a different run."""


def checkpoint_path(run_dir: Path) -> Path:
    return Path(run_dir) / "last" / "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    atomic_save(lambda temp: torch.save({"format": CHECKPOINT_FORMAT, **state}, temp), path)


def load_checkpoint(path: Path, identity: dict) -> dict:
    """Reads the checkpoint and refuses it when it was made by a run with other settings."""
    if not path.is_file():
        raise ResumeError(f"--resume: no checkpoint at {path}; start the run without --resume")
    try:
        state = load_torch_file(path)
    except CheckpointError as error:
        raise ResumeError(str(error)) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path}: not a training checkpoint written by this project")
    saved = state.get("identity", {})
    different = {key: (saved.get(key), value) for key, value in identity.items() if saved.get(key) != value}
    if different:
        details = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in sorted(different.items()))
        raise ResumeError(
            f"{path} was made by a different run ({details}). Resume with the same settings, or start a new run "
            "with another --output-dir (or --overwrite)"
        )
    return state


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, is_main: bool) -> None:
    """Refuses to start over an earlier run's results unless told to resume or overwrite; with --overwrite,
    removes that run's files (only those this trainer writes)."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        return
    if existing and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, --overwrite to "
            "start again, or choose another --output-dir"
        )
    if existing and is_main:
        for name in existing:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def restore_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ResumeError(f"{path}: trainable tensors do not match this model (missing {missing[:5]}, unexpected {extra[:5]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
