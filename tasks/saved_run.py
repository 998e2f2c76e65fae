"""A finished (or interrupted) run directory as a model again: the analogue of peft's PeftModel.from_pretrained.

    from tasks.saved_run import load_run
    model = load_run("runs/sst-loreft")          # GPT-2, the method and the task head; eval mode, frozen
    logits = model(input_ids, attention_mask)    # (B, 5) for SST; for sonnets the GPT2Model itself

The run's log.json says which task, base model, tokenizer, method and precision it used; the adapter in
<run>/best/ holds the trained tensors and the base model's fingerprint, so loading onto other base weights
(a moved or replaced checkpoint) is refused unless allow_other_base=True.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from models.gpt2 import GPT2Model, resolve_device, resolve_precision
from models.peft import ADAPTER_CONFIG, apply_method, check_adapter_config, load_adapter, read_adapter_config
from models.tokenizer import GPT2Tokenizer, tokenizer_source
import tasks
from tasks.config import TrainConfig
from tasks.task import Task


@dataclass
class SavedRun:
    """What a run directory loads into: its settings, its task, the tokenizer and the task model."""

    run_dir: Path
    config: TrainConfig
    task: Task
    tokenizer: GPT2Tokenizer
    model: nn.Module  # the task model (for sonnets the GPT2Model itself), best adapter loaded
    device: torch.device


def read_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig recorded in <run_dir>/log.json."""
    path = Path(run_dir) / "log.json"
    try:
        log = json.loads(path.read_text())
        return TrainConfig.from_dict(log["config"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no log.json here; is {run_dir} a run directory written by train_*.py "
                                "(its --output-dir)?") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the run's settings ({type(error).__name__}: {error})") from None


def open_run(run_dir: str | Path, *, device: str = "cpu", precision: Optional[str] = None,
             model: Optional[str] = None, tokenizer: Optional[str] = None, trainable: bool = False,
             allow_other_base: bool = False) -> SavedRun:
    """Rebuilds a run's task model with its best adapter (see `load_run`) and returns it with its settings."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    best = run_dir / "best"
    if not (best / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{best}: no saved model; the run in {run_dir} stopped before its first evaluation "
                                "(continue it with --resume)")
    # The adapter's own record of its methods, not the run's flags: they hold what `--layers auto:K` resolved to.
    # A damaged adapter is reported here, before the base model loads.
    methods = check_adapter_config(read_adapter_config(best), best)
    task = tasks.get_task(config.task)
    base = model or config.model
    device = resolve_device(device)
    tokenizer = GPT2Tokenizer.from_pretrained(tokenizer_source(base, tokenizer or config.tokenizer))
    torch.manual_seed(config.seed)  # a random:<size> base is rebuilt from the run's seed, as the trainer built it
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="GPT2Model: random weights")
        gpt = GPT2Model.from_pretrained(base, device=device)
    if config.dropout is not None:
        gpt.set_dropout(config.dropout)
    apply_method(gpt, methods)
    task_model = task.build_model(gpt, tokenizer).to(device)
    # Trainable as in training while the precision is applied (what trains stays fp32), then frozen unless asked.
    load_adapter(task_model, best, trainable=True, allow_other_base=allow_other_base)
    gpt.set_precision(resolve_precision(precision or config.precision, device))
    task_model.eval()
    if not trainable:
        task_model.requires_grad_(False)
    return SavedRun(run_dir, config, task, tokenizer, task_model, device)


def load_run(run_dir: str | Path, *, device: str = "cpu", precision: Optional[str] = None,
             model: Optional[str] = None, tokenizer: Optional[str] = None, trainable: bool = False,
             allow_other_base: bool = False) -> nn.Module:
    """The task model of a run directory (train_*.py's --output-dir): the base model it was trained on, its
    method and its head, with the best checkpoint's tensors (<run_dir>/best/), in eval mode.

    Every parameter is frozen unless `trainable`, which leaves the method's parts and the head trainable as in
    training (to continue fine-tuning). `precision` defaults to the run's (auto: bf16 where it pays), `model`
    replaces the recorded base (a checkpoint moved elsewhere; its weights must be the same, checked by their
    fingerprint, unless `allow_other_base`), `tokenizer` the recorded tokenizer directory."""
    return open_run(run_dir, device=device, precision=precision, model=model, tokenizer=tokenizer,
                    trainable=trainable, allow_other_base=allow_other_base).model
