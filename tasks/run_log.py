"""Step-level training logs: <run>/steps.jsonl every --log-every optimizer steps (loss, learning rate, tokens/s,
gradient norm), TensorBoard event files in <run>/tensorboard/ with --tensorboard (an optional dependency), and
<run>/training.png at the end (training loss and the dev metric; written when matplotlib is installed).

steps.jsonl holds one JSON object a line, each written with one write() and flushed, so an interrupted run
leaves whole lines (at worst a torn last one, dropped when read). A resumed run first drops the lines after
the step its checkpoint holds, since it trains those steps again: the file then reads as one run's would.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from data.atomic import atomic_save

STEP_LOG, PLOT, TENSORBOARD_DIR = "steps.jsonl", "training.png", "tensorboard"


def read_step_log(path: str | Path) -> list[dict]:
    """The entries of a steps.jsonl file; a line that is not a whole JSON object (a torn last line) is skipped."""
    entries = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("step"), int):
            entries.append(entry)
    return entries


def tensorboard_writer(directory: Path):
    """A torch SummaryWriter, or an error saying what to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package (pip install tensorboard); steps.jsonl in the "
                         "run directory holds the same metrics without it") from None
    return SummaryWriter(log_dir=str(directory))


class StepLog:
    """Writes the step entries of one run. `start_step` is the optimizer step the run continues from (0 for a
    fresh run): entries after it, left by the interrupted run, are dropped."""

    def __init__(self, run_dir: Path, every: Optional[int], tensorboard: bool = False, start_step: int = 0):
        self.path, self.every = Path(run_dir) / STEP_LOG, every
        if every or self.path.exists():
            kept = [e for e in read_step_log(self.path) if e["step"] <= start_step] if start_step else []
            text = "".join(json.dumps(e) + "\n" for e in kept)
            atomic_save(lambda temp: Path(temp).write_text(text, encoding="utf-8"), self.path)
        self.file = open(self.path, "a", encoding="utf-8") if every else None
        self.writer = tensorboard_writer(Path(run_dir) / TENSORBOARD_DIR) if tensorboard else None

    def step(self, step: int, entry: dict) -> None:
        """`entry` (loss, lr, tokens_per_second, grad_norm, ...) of optimizer step `step` (1-based)."""
        if not self.every or step % self.every:
            return
        line = {"step": step, **{k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                                 for k, v in entry.items()}}
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        if self.writer is not None:
            for name, value in entry.items():
                if isinstance(value, (int, float)) and name != "epoch":
                    self.writer.add_scalar(f"train/{name}", value, step)

    def epoch(self, entry: dict) -> None:
        """An epoch's log entry: its dev metrics go to TensorBoard."""
        if self.writer is not None:
            for name, value in (entry.get("dev") or {}).items():
                self.writer.add_scalar(f"dev/{name}", value, entry["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_run(run_dir: Path, history: list[dict], metric: str, title: str = "") -> Optional[Path]:
    """<run>/training.png: the training loss (each logged step, else each epoch's mean) and the dev metric per
    epoch. None when matplotlib is not installed or there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = read_step_log(Path(run_dir) / STEP_LOG)
    losses = [(e["step"], e["loss"]) for e in steps if e.get("loss") is not None] or \
        [(e["step"], e["train_loss"]) for e in history]
    dev = [(e["step"], e["dev"][metric]) for e in history if (e.get("dev") or {}).get(metric) is not None]
    if not losses and not dev:
        return None
    figure, loss_axis = plt.subplots(figsize=(7, 4))
    if losses:
        loss_axis.plot(*zip(*losses), color="tab:blue", label="training loss")
    loss_axis.set_xlabel("optimizer step")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    if dev:
        dev_axis = loss_axis.twinx()
        dev_axis.plot(*zip(*dev), "o-", color="tab:orange", label=f"dev {metric}")
        dev_axis.set_ylabel(f"dev {metric}", color="tab:orange")
    loss_axis.set_title(title or Path(run_dir).name)
    figure.tight_layout()
    target = Path(run_dir) / PLOT
    atomic_save(lambda temp: figure.savefig(temp, format="png", dpi=100), target)
    plt.close(figure)
    return target
