"""The resume checkpoint (<run>/last/checkpoint.pt), the run directory's guard against silent overwrites, and its
lock against two runs at once.

The checkpoint holds what an interrupted run needs to continue exactly where it stopped: the trainable
tensors, the optimizer and scheduler state, every rank's RNG state, the position in the epoch, the best dev
metric so far, the log, and fingerprints of the tokenizer and the data it trained on (a resume refuses other
ones). It is written atomically and read with `weights_only=True` (a checkpoint must not
be able to run code). The best model itself is saved separately, as an adapter (<run>/best/).
"""
from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from data.atomic import atomic_save
from models.loading import CheckpointError, load_torch_file
from tasks.run_log import PLOT, STEP_LOG, TENSORBOARD_DIR

CHECKPOINT_FORMAT = "gpt2-peft-training-checkpoint"
RUN_FILES = ("log.json", "best", "last", "layer_scores.png", STEP_LOG, PLOT, TENSORBOARD_DIR)
# What a resume reads from the checkpoint ("fingerprints" is checked when present: older checkpoints lack it).
CHECKPOINT_KEYS = ("identity", "trainable", "optimizer", "scheduler", "rng", "progress", "best", "history")


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
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing:
        raise ResumeError(damaged(path, f"it has no {missing[0]!r} entry"))
    saved = state["identity"]
    if not isinstance(saved, dict):
        raise ResumeError(damaged(path, "its 'identity' entry is not a record"))
    different = {key: (saved.get(key), value) for key, value in identity.items() if saved.get(key) != value}
    if different:
        details = "; ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in sorted(different.items()))
        raise ResumeError(
            f"{path} was made by a different run ({details}). Resume with the same settings, or start a new run "
            "with another --output-dir (or --overwrite)"
        )
    return state


def damaged(path: Path, problem: str) -> str:
    return (f"{path}: damaged checkpoint, {problem}; it cannot be resumed (start again with --overwrite, or "
            "choose another --output-dir)")


def record_from(cls: type, raw: Any, path: Path, key: str) -> Any:
    """The dataclass `cls` from the checkpoint's `key` record, every field required: a record written short would
    otherwise resume with defaults in place of the lost values."""
    if not isinstance(raw, dict):
        raise ResumeError(damaged(path, f"its {key!r} entry is not a record"))
    names = [f.name for f in dataclasses.fields(cls)]
    missing = [name for name in names if name not in raw]
    if missing:
        raise ResumeError(damaged(path, f"its {key!r} record has no {missing[0]!r}"))
    return cls(**{name: raw[name] for name in names})


def check_fingerprints(path: Path, state: dict, current: dict[str, str], sources: dict[str, str]) -> None:
    """Refuses to resume when what the run reads differs from what the checkpointed run read: other rows under
    the same data file name, or another tokenizer. `current` holds this run's fingerprints by name
    ("tokenizer", "train"), `sources` says what each is of, for the message."""
    saved = state.get("fingerprints")
    if not isinstance(saved, dict):
        return  # written before checkpoints held fingerprints
    changed = [name for name, value in current.items() if name in saved and saved[name] != value]
    if "tokenizer" in changed:  # then the examples' token ids differ too: the tokenizer is the cause
        changed = ["tokenizer"]
    if changed:
        details = "; ".join(f"{sources[name]} (fingerprint {saved[name][:12]} in the checkpoint, {current[name][:12]} "
                            "now)" for name in changed)
        raise ResumeError(f"{path}: cannot resume, what this run reads has changed since the checkpoint: {details}. "
                          "Resume with the data and tokenizer the run started with, or start a new run (--overwrite, "
                          "or another --output-dir)")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuses to start over an earlier run's results unless told to resume or overwrite; deletes nothing (an
    --overwrite run clears the old files only once its own model and data have loaded: `clear_run_dir`).
    Returns whether the run starts afresh over earlier files: with --overwrite, or with --resume when the
    earlier run was interrupted before it wrote its first checkpoint (it then simply starts again)."""
    existing = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume:
        if checkpoint_path(run_dir).is_file():
            return False
        if not existing:
            raise ResumeError(f"--resume: no checkpoint at {checkpoint_path(run_dir)}; start the run without --resume")
        return True  # interrupted before the first checkpoint: nothing to continue, so it starts again
    if existing and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run ({', '.join(existing)}); pass --resume to continue it, --overwrite to "
            "start again, or choose another --output-dir"
        )
    return bool(existing)


def clear_run_dir(run_dir: Path) -> None:
    """Removes an earlier run's files (only those this trainer writes)."""
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def remove_stale_temp_files(run_dir: Path) -> list[Path]:
    """Deletes the temporary files of atomic writes that a killed run left in the run directory (`.<name>.*.tmp`
    beside a checkpoint or adapter). Call it holding the run's lock, so that no live run's file goes."""
    stale = [path for folder in (run_dir, run_dir / "best", run_dir / "last") if folder.is_dir()
             for path in folder.glob(".*.tmp") if path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


class RunDirInUse(OSError):
    """Another process is training into the same run directory."""


class RunLock:
    """An exclusive lock on a run directory (`<run>/.lock`, flock), held while a run trains: a second run into
    the same directory is refused with the first one's process id, and a run that dies, even by kill -9, leaves
    no stale lock (the kernel releases it with the process)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.handle = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise RunDirInUse(f"{self.path.parent} is in use by another run ({owner}); wait for it to finish, or "
                              "choose another --output-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return self

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_trainable(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
        raise ResumeError(f"{path}: trainable tensors do not match this model (missing {missing[:5]}, unexpected {extra[:5]})")
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
