"""The one training loop behind train_sentiment.py, train_paraphrase.py, train_sonnet.py and compare.py.

    from tasks.cli import parse_args
    from tasks.trainer import run_training
    result = run_training("sst", parse_args("sst", ["--method", "loreft", "--epochs", "3"]))
    print(result.best_dev_metric, result.train_tokens_per_second)

Per epoch: length-bucketed batches from the seed, gradient accumulation, warmup then linear decay, gradient
clipping, a stop with a clear message on a NaN loss, dev evaluation, the best adapter kept by the dev
metric (<run>/best/), early stopping, a JSON log (<run>/log.json) and a resume checkpoint (<run>/last/).
At the end the best adapter is reloaded and writes the dev and test predictions.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import resource
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn
from tqdm import tqdm

from models.gpt2 import GPT2Model, resolve_precision
from data.atomic import atomic_save
from models.peft import (
    adapter_file_size,
    apply_method,
    format_parameter_summary,
    load_adapter,
    parameter_summary,
    save_adapter,
)
from models.tokenizer import GPT2Tokenizer
from models.tokenizer import tokenizer_source as models_tokenizer_source
from modules.optimizer import AdamW
from tasks import checkpoint as ckpt
from tasks.batching import bucketed_batches
from tasks.config import TrainConfig
from tasks.distributed import Distributed, setup_distributed, teardown_distributed
from tasks.task import Example, Task


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


@dataclass
class RunResult:
    task: str
    method: dict
    best_epoch: Optional[int]  # 1-based; None when no epoch was evaluated
    best_dev_metric: Optional[float]  # the task's dev metric of the best checkpoint (None without dev labels)
    metric: str
    dev_metrics: dict  # every dev metric of the best checkpoint, from the final predictions
    epochs: list  # the per-epoch log entries
    stopped: str  # 'finished', 'early stopping' or 'already finished'
    trainable_params: int
    total_params: int
    adapter_bytes: int
    epoch_seconds: list  # training time of each epoch, evaluation excluded
    train_tokens_per_second: float  # real (non-padding) training tokens of all ranks per training second
    peak_memory_bytes: int  # torch.cuda.max_memory_allocated on a GPU, the peak RSS during the run on a CPU
    inference_seconds_per_example: Optional[float]  # final dev predictions, batched; None without dev examples
    precision: str
    device: str
    world_size: int
    paths: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- set-up
def tokenizer_source(config: TrainConfig) -> str:
    """--tokenizer, else the model directory when it carries vocab.json, else the hub's gpt2."""
    return models_tokenizer_source(config.model, config.tokenizer)


def warmup_then_decay(total_steps: int, warmup_steps: int):
    """LR factor for optimizer step `step` (0-based): linear warmup, then linear decay; never exactly zero."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(total_steps - step, 1) / max(total_steps - warmup_steps, 1)
    return factor


def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> AdamW:
    """Weight decay on matrices only: decaying biases and LayerNorm gains towards zero only hurts."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def reset_peak_memory(device: torch.device) -> None:
    """Starts a new peak-memory measurement, so that several runs in one process (compare.py) each report
    their own peak. On Linux, writing 5 to /proc/self/clear_refs resets the peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
    except OSError:
        pass  # elsewhere the peak is the whole process's


def peak_memory_bytes(device: torch.device) -> int:
    """The GPU's peak allocated memory, or the process's peak resident set size on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


class LossModule(nn.Module):
    """The task model with the task's loss as its forward, so that DistributedDataParallel can wrap it."""

    def __init__(self, task: Task, model: nn.Module):
        super().__init__()
        self.task, self.model = task, model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.task.loss(self.model, batch)


# ----------------------------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, task: Task, config: TrainConfig, dist: Distributed, device: torch.device):
        self.task, self.config, self.dist, self.device = task, config, dist, device
        self.run_dir = config.run_dir
        self.precision = resolve_precision(config.precision, device)
        self.history: list[dict] = []
        self.best = {"metric": None, "epoch": None, "stale": 0}
        self.progress = self.epoch_start(epoch=0, step=0)
        self.status = "running"
        self.latest_dev = None  # (epoch, predictions, seconds) of the newest dev evaluation in this process

    @staticmethod
    def epoch_start(epoch: int, step: int) -> dict:
        """Where training stands, as saved in the resume checkpoint: the epoch, the next micro-batch in it, the
        optimizer steps so far, and this epoch's running sums (this rank's loss, all ranks' gradient norms)."""
        return {"epoch": epoch, "batch": 0, "step": step, "loss_sum": 0.0, "terms": 0, "tokens": 0, "seconds": 0.0,
                "grad_norm_sum": 0.0, "steps": 0}

    # ---- output
    def say(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(message)

    def bar(self, **kwargs):
        return tqdm(disable=None if self.dist.is_main else True, leave=False, dynamic_ncols=True, **kwargs)

    # ---- set-up
    def setup(self) -> None:
        config = self.config
        reset_peak_memory(self.device)
        self.task.check_method(config.method)
        ckpt.prepare_run_dir(self.run_dir, config.resume, config.overwrite, self.dist.is_main)
        # A checkpoint of another run is refused before minutes go into loading the model and the data.
        resume_state = ckpt.load_checkpoint(ckpt.checkpoint_path(self.run_dir), self.identity()) if config.resume else None
        self.dist.barrier()
        self.tokenizer = GPT2Tokenizer.from_pretrained(tokenizer_source(config))
        self.build_model()
        self.load_data()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.summary = parameter_summary(self.model)
        if not self.params:
            raise ValueError(f"--method {config.method.method} leaves nothing to train on task {self.task.name}")
        self.optimizer = build_optimizer(self.model, config.learning_rate, config.weight_decay)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.splits["train"]) / config.batch_size) / config.grad_accum)
        total = self.steps_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_then_decay(total, round(config.warmup_ratio * total)))
        self.loss_module = self.dist.wrap(LossModule(self.task, self.model), self.device)
        self.say(f"{self.task.name} / {config.method.method}: {format_parameter_summary(self.model)}")
        self.say(f"  {len(self.splits['train'])} train, {len(self.splits['dev'])} dev, {len(self.splits['test'])} test "
                 f"examples; {config.epochs} epoch{'s' if config.epochs > 1 else ''} of {self.steps_per_epoch} steps (batch {config.batch_size} x "
                 f"{config.grad_accum} accumulation); lr {config.learning_rate:g}; {self.device} {self.precision}"
                 + (f"; {self.dist.world_size} processes" if self.dist.enabled else ""))
        for note in self.data_notes:
            self.say(note)
        if resume_state is not None:
            self.restore(resume_state)

    def build_model(self) -> None:
        """GPT-2 (the same random or loaded weights on every rank), the method applied, the task's model around
        it, then the precision: the paraphrase head copies embedding rows while they are still fp32."""
        config = self.config
        torch.manual_seed(config.seed)
        with warnings.catch_warnings():
            if not self.dist.is_main:
                warnings.simplefilter("ignore")
            gpt = GPT2Model.from_pretrained(config.model, device=self.device)
        if self.tokenizer.vocab_size > gpt.config.vocab_size:
            raise ValueError(f"the tokenizer ({tokenizer_source(config)}) has {self.tokenizer.vocab_size} tokens, more "
                             f"than the vocabulary of the model {config.model} ({gpt.config.vocab_size}); pass the "
                             "tokenizer that belongs to the model")
        if config.dropout is not None:
            gpt.set_dropout(config.dropout)
        apply_method(gpt, config.method)
        self.model = self.task.build_model(gpt, self.tokenizer).to(self.device)
        self.gpt = gpt.set_precision(self.precision)

    def load_data(self) -> None:
        config = self.config
        context = self.gpt.config.n_positions
        if config.max_length is not None and config.max_length > context:
            raise ValueError(f"--max-length {config.max_length} exceeds the context of the model {config.model} "
                             f"({context} tokens)")
        max_length = config.max_length or context
        data = self.task.load(config, self.tokenizer, max_length)
        self.splits = data.splits
        if not self.splits["train"]:
            raise ValueError(f"{data.paths['train']}: no training examples")
        self.data_notes = [f"  note: no test file at {data.paths['test']}, so no test predictions"] \
            if not data.splits["test"] and not data.paths["test"].is_file() else []
        self.data_notes += data.notes
        self.data_notes += [f"  warning: {count} {name} texts were longer than {max_length} tokens and were truncated"
                            for name, count in data.truncated.items() if count]

    def identity(self) -> dict:
        """Settings a resumed run must share with the checkpoint, or its result would be a different run's."""
        c = self.config
        return {"task": c.task, "model": c.model, "method": c.method.to_dict(), "seed": c.seed, "epochs": c.epochs,
                "lr": c.learning_rate, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
                "warmup_ratio": c.warmup_ratio, "weight_decay": c.weight_decay, "max_grad_norm": c.max_grad_norm,
                "max_length": c.max_length, "max_train_examples": c.max_train_examples, "dropout": c.dropout}

    # ---- checkpoints
    def save_resume_checkpoint(self) -> None:
        rng = self.dist.gather([ckpt.rng_state(self.device)])
        if not self.dist.is_main:
            return
        ckpt.save_checkpoint(ckpt.checkpoint_path(self.run_dir), {
            "identity": self.identity(),
            "trainable": ckpt.trainable_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "progress": dict(self.progress),
            "best": dict(self.best),
            "history": self.history,
        })

    def restore(self, state: dict) -> None:
        path = ckpt.checkpoint_path(self.run_dir)
        ckpt.restore_trainable(self.model, state["trainable"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"]
        ckpt.restore_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0], self.device)
        self.progress, self.best, self.history = dict(state["progress"]), dict(state["best"]), list(state["history"])
        self.say(f"  resumed from {path}: epoch {self.progress['epoch'] + 1}, step {self.progress['step']}")

    def write_log(self, final: Optional[dict] = None) -> None:
        if not self.dist.is_main:
            return
        log = {"task": self.task.name, "status": self.status, "config": self.config.to_dict(),
               "parameters": self.summary, "precision": self.precision, "device": str(self.device),
               "world_size": self.dist.world_size, "best_epoch": self.best["epoch"],
               "best_dev_metric": self.best["metric"], "metric": self.task.metric, "epochs": self.history}
        if final is not None:
            log["final"] = final
        atomic_save(lambda temp: Path(temp).write_text(json.dumps(log, indent=2) + "\n"), self.run_dir / "log.json")

    # ---- the loop
    def train(self) -> None:
        config = self.config
        while not self.done():
            epoch = self.progress["epoch"]
            self.train_epoch(epoch)
            loss_sum, terms, tokens = self.dist.all_reduce_sum(
                [self.progress["loss_sum"], self.progress["terms"], self.progress["tokens"]], self.device)
            entry = {"epoch": epoch + 1, "train_loss": loss_sum / max(terms, 1), "train_seconds": self.progress["seconds"],
                     "train_tokens": int(tokens), "train_tokens_per_second": tokens / max(self.progress["seconds"], 1e-9),
                     "grad_norm": self.progress["grad_norm_sum"] / max(self.progress["steps"], 1),
                     "lr": self.scheduler.get_last_lr()[0], "step": self.progress["step"]}
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
                entry.update(self.evaluate_epoch(epoch))
            self.history.append(entry)
            self.say(f"epoch {epoch + 1}/{config.epochs}: train loss {entry['train_loss']:.4f}"
                     + (f", dev {self.task.describe(entry['dev'])}" if entry.get("dev") else "")
                     + f" ({entry['train_seconds']:.1f} s, {entry['train_tokens_per_second']:.0f} tokens/s)")
            self.progress = self.epoch_start(epoch + 1, self.progress["step"])
            if self.done() and self.status == "early stopping":
                self.say(f"early stopping: no better dev {self.task.metric} for {config.patience} evaluations")
            self.write_log()
            self.save_resume_checkpoint()

    def done(self) -> bool:
        if self.config.patience is not None and self.best["stale"] >= self.config.patience:
            self.status = "early stopping"
        return self.status != "running" or self.progress["epoch"] >= self.config.epochs

    def train_epoch(self, epoch: int) -> None:
        config, train = self.config, self.splits["train"]
        batches = bucketed_batches([e.length for e in train], config.batch_size, config.seed, epoch)
        groups = [batches[i:i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
        first_group = self.progress["batch"] // config.grad_accum
        self.model.train()
        with self.bar(total=len(groups), initial=first_group, desc=f"epoch {epoch + 1}/{config.epochs}") as bar:
            for group in groups[first_group:]:
                start = time.perf_counter()
                step_loss = self.train_step(group, train)
                self.progress["seconds"] += time.perf_counter() - start
                self.progress["batch"] += len(group)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
                if config.save_every_steps and self.progress["step"] % config.save_every_steps == 0 \
                        and self.progress["batch"] < len(batches):
                    self.save_resume_checkpoint()

    def train_step(self, group: list[list[int]], train: list[Example]) -> float:
        """One optimizer step over `group` (grad_accum micro-batches of the global batch); returns its mean loss."""
        task, dist = self.task, self.dist
        terms = sum(task.loss_terms(train[i]) for batch in group for i in batch)
        local_sum, local_terms = 0.0, 0
        for k, batch in enumerate(group):
            share = dist.shard(batch)
            # DDP averages gradients over ranks, hence world_size / terms: the sum equals the one-process mean.
            weight = dist.world_size / terms
            if not share:  # fewer examples than ranks: take part in the gradient exchange with a zero loss
                share, weight = batch[:1], 0.0
            examples = [train[i] for i in share]
            inputs = task.collate(examples, self.device)
            last = k == len(group) - 1
            sync = contextlib.nullcontext() if last or not dist.enabled else self.loss_module.no_sync()
            with sync:
                loss = self.loss_module(inputs)
                (loss * weight).backward()
            if weight:
                local_sum += loss.item()
                local_terms += sum(task.loss_terms(e) for e in examples)
                self.progress["tokens"] += sum(e.length for e in examples)
        if self.config.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        step_loss = local_sum / max(local_terms, 1)
        if not (math.isfinite(grad_norm) and math.isfinite(step_loss)):
            self.diverged(step_loss, grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress["step"] += 1
        self.progress["steps"] += 1
        self.progress["grad_norm_sum"] += grad_norm
        self.progress["loss_sum"] += local_sum
        self.progress["terms"] += local_terms
        return step_loss

    def diverged(self, loss: float, grad_norm: float) -> None:
        self.status = "diverged"
        self.write_log()
        hints = "lower --lr, raise --warmup-ratio or keep --max-grad-norm" + (
            ", or try --precision fp32" if self.precision == "bf16" else "")
        best = f" The best checkpoint so far is in {self.run_dir / 'best'}." if self.best["epoch"] is not None else ""
        raise TrainingDiverged(
            f"training stopped: the loss ({loss:.4g}) or its gradient (norm {grad_norm:.4g}) is not finite at epoch "
            f"{self.progress['epoch'] + 1}, step {self.progress['step'] + 1}; {hints}.{best}"
        )

    # ---- evaluation
    def predict(self, split: str) -> tuple[list, float]:
        """Predictions for a whole split (sharded over ranks, gathered) and the seconds they took."""
        examples = self.splits[split]
        start = time.perf_counter()
        with self.bar(total=len(examples), desc=f"predict {split}") as bar:
            local = self.task.predict(self.model, self.dist.shard(examples), self.config, self.device, progress=bar)
        predictions = self.dist.gather(local)
        return predictions, time.perf_counter() - start

    def evaluate_epoch(self, epoch: int) -> dict:
        if not self.splits["dev"]:
            self.save_best(epoch, None)
            return {}
        predictions, seconds = self.predict("dev")
        self.latest_dev = (epoch + 1, predictions, seconds)
        metrics = self.task.metrics(self.splits["dev"], predictions)
        value = metrics.get(self.task.metric)
        if value is None or self.best["metric"] is None or value > self.best["metric"]:
            self.save_best(epoch, value)
        else:
            self.best["stale"] += 1
        return {"dev": metrics, "dev_seconds": seconds, "best": self.best["epoch"] == epoch + 1}

    def save_best(self, epoch: int, value: Optional[float]) -> None:
        """Keeps this epoch's model as the best (with no dev metric to compare, the latest is the best)."""
        self.best = {"metric": value, "epoch": epoch + 1, "stale": 0}
        if self.dist.is_main:
            save_adapter(self.model, self.run_dir / "best")

    # ---- the end
    def finish(self, already_finished: bool) -> RunResult:
        config, task = self.config, self.task
        best_dir = self.run_dir / "best"
        self.dist.barrier()  # rank 0 has written best/ before anyone reads it
        if (best_dir / "adapter_config.json").is_file():
            load_adapter(self.model, best_dir)
        paths = {"run_dir": str(self.run_dir), "log": str(self.run_dir / "log.json"), "best": str(best_dir),
                 "checkpoint": str(ckpt.checkpoint_path(self.run_dir))}
        dev_metrics, seconds_per_example = {}, None
        for split in ("dev", "test"):
            examples = self.splits[split]
            if not examples:
                continue
            if split == "dev" and self.latest_dev is not None and self.latest_dev[0] == self.best["epoch"] \
                    and self.history and self.history[-1]["epoch"] == self.best["epoch"]:
                _, predictions, seconds = self.latest_dev  # the best model is the current one: no second pass
            else:
                predictions, seconds = self.predict(split)
            path = task.prediction_path(config, split)
            if self.dist.is_main:
                task.write_predictions(path, examples, predictions)
            paths[f"{split}_predictions"] = str(path)
            if split == "dev":
                dev_metrics = task.metrics(examples, predictions)
                seconds_per_example = seconds / len(examples)
        if self.status == "running":
            self.status = "already finished" if already_finished else "finished"
        peak_memory = peak_memory_bytes(self.device)
        self.write_log(final={"dev": dev_metrics, "predictions": {k: v for k, v in paths.items() if k.endswith("predictions")},
                              "peak_memory_bytes": peak_memory, "inference_seconds_per_example": seconds_per_example})
        epoch_seconds = [entry["train_seconds"] for entry in self.history]
        tokens = sum(entry["train_tokens"] for entry in self.history)
        result = RunResult(
            task=task.name, method=config.method.to_dict(), best_epoch=self.best["epoch"],
            best_dev_metric=dev_metrics.get(task.metric), metric=task.metric, dev_metrics=dev_metrics,
            epochs=self.history, stopped=self.status, trainable_params=self.summary["trainable"],
            total_params=self.summary["total"],
            adapter_bytes=adapter_file_size(best_dir) if (best_dir / "adapter_config.json").is_file() else 0,
            epoch_seconds=epoch_seconds, train_tokens_per_second=tokens / max(sum(epoch_seconds), 1e-9),
            peak_memory_bytes=peak_memory, inference_seconds_per_example=seconds_per_example,
            precision=self.precision, device=str(self.device), world_size=self.dist.world_size, paths=paths,
        )
        score = f"dev {task.describe(dev_metrics)}" if dev_metrics else "no dev labels"
        self.say(f"{task.name} / {config.method.method}: {score} (best epoch {self.best['epoch']}, {self.status}); "
                 f"{self.summary['trainable']:,} trainable params; predictions: "
                 + (", ".join(v for k, v in paths.items() if k.endswith("predictions")) or "none"))
        return result

    def run(self) -> RunResult:
        self.setup()
        already_finished = self.done()
        try:
            self.train()
        except KeyboardInterrupt:
            self.status = "interrupted"  # the log says so; --resume continues from the last checkpoint
            self.write_log()
            raise
        return self.finish(already_finished)


def run_training(task: Union[str, Task], config: Union[TrainConfig, list[str]]) -> RunResult:
    """Trains, evaluates and writes predictions for one task with one method; what the scripts and
    compare.py call. `config` may be a TrainConfig or command-line arguments for the task's script."""
    from tasks import get_task
    from tasks.cli import parse_args

    task = get_task(task) if isinstance(task, str) else task
    if not isinstance(config, TrainConfig):
        config = parse_args(task.name, list(config))
    if config.task != task.name:
        raise ValueError(f"run_training: config is for task {config.task!r}, not {task.name!r}")
    started = not torch.distributed.is_initialized()
    dist, device = setup_distributed(config.device)
    try:
        return Trainer(task, config, dist, device).run()
    finally:
        if started:
            teardown_distributed()
