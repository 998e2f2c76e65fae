"""The one training loop behind train_sentiment.py, train_paraphrase.py, train_sonnet.py and compare.py.

    from tasks.cli import parse_args
    from tasks.trainer import run_training
    result = run_training("sst", parse_args("sst", ["--method", "loreft", "--epochs", "3"]))   # or a TrainConfig
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
from typing import Optional, Sequence, Union

import torch
from torch import nn
from tqdm import tqdm

from models.gpt2 import GPT2Model, resolve_precision
from data.atomic import atomic_save, check_writable
from models.peft import (
    ADAPTER_CONFIG,
    adapter_file_size,
    apply_method,
    format_parameter_summary,
    load_adapter,
    parameter_summary,
    save_adapter,
    trainable_by_method,
    trained_tensors,
    virtual_positions,
)
from models.methods import combination_name, method_parts, method_to_json
from models.tokenizer import GPT2Tokenizer
from models.tokenizer import tokenizer_source as models_tokenizer_source
from modules.optimizer import AdamW
import tasks
from tasks import checkpoint as ckpt
from tasks import feature_cache
from tasks.batching import bucketed_batches
from tasks.config import TrainConfig
from tasks.distributed import Distributed, setup_distributed, teardown_distributed
from tasks.run_log import StepLog, plot_run
from tasks.layer_choice import plot_layer_scores, resolve_auto_layers
from tasks.task import Example, Task, examples_fingerprint


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite."""


@dataclass
class Progress:
    """Where training stands, as the resume checkpoint stores it: the epoch (0-based), the next micro-batch in
    it, the optimizer steps of the whole run, and this epoch's running sums (this rank's loss, loss terms and
    tokens; all ranks' gradient norms)."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    epoch_steps: int = 0
    loss_sum: float = 0.0
    terms: int = 0
    tokens: int = 0
    seconds: float = 0.0
    grad_norm_sum: float = 0.0

    def next_epoch(self) -> "Progress":
        return Progress(epoch=self.epoch + 1, step=self.step)

    @classmethod
    def from_dict(cls, raw: dict, path: Path = Path("checkpoint")) -> "Progress":
        if isinstance(raw, dict) and "steps" in raw:  # checkpoints written before this field had its name
            raw = {("epoch_steps" if key == "steps" else key): value for key, value in raw.items()}
        return ckpt.record_from(cls, raw, path, "progress")


@dataclass
class Best:
    """The best dev evaluation so far: its metric (None without dev labels), its 1-based epoch, and how many
    evaluations since have not beaten it (early stopping counts these)."""

    metric: Optional[float] = None
    epoch: Optional[int] = None
    stale: int = 0


@dataclass
class RunResult:
    task: str
    method: Union[dict, list]  # the method's MethodConfig as JSON; a combination's: a list, one per part
    method_name: str  # 'lora', or 'lora+loreft' for a combination
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


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    part_lrs: Sequence[tuple[float, Sequence[nn.Parameter]]] = ()) -> AdamW:
    """Weight decay on matrices only: decaying biases and LayerNorm gains towards zero only hurts. The parameters
    of each (lr, parameters) pair of `part_lrs` (a combination's parts) train at that lr, the rest at `lr`: one
    group per learning rate and kind, which the scheduler scales alike."""
    lr_of = {id(p): part_lr for part_lr, params in part_lrs for p in params}
    params = [p for p in model.parameters() if p.requires_grad]
    rates = list(dict.fromkeys(lr_of.get(id(p), lr) for p in params))
    groups = [{"params": [p for p in params if lr_of.get(id(p), lr) == rate and (p.dim() >= 2) == matrix],
               "lr": rate, "weight_decay": weight_decay if matrix else 0.0}
              for rate in rates for matrix in (True, False)]
    return AdamW([g for g in groups if g["params"]], lr=lr, weight_decay=weight_decay)


def describe_learning_rates(config: TrainConfig) -> str:
    """'0.001', or each part's when a combination's parts train at different rates: '0.03 (lora 0.001, ...)'."""
    parts = method_parts(config.method)
    rates = {combination_name(part): config.part_learning_rate(part) for part in parts}
    if len(set(rates.values())) < 2:
        return f"{config.learning_rate:g}"
    return f"{config.learning_rate:g} (" + ", ".join(f"{name} {rate:g}" for name, rate in rates.items()) + ")"


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
        self.best = Best()
        self.progress = Progress()
        self.status = "running"
        self.latest_dev = None  # (epoch, predictions, seconds) of the newest dev evaluation in this process
        self.layer_choices, self.layer_plot = [], None  # --layers auto:K, one per K asked (tasks/layer_choice.py)
        self.lock = ckpt.RunLock(self.run_dir)
        self.cache = None  # the frozen part's cache (tasks/feature_cache.py), when the method leaves one to keep
        self.step_log = None  # rank 0's StepLog (tasks/run_log.py), from setup on

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
        restart = ckpt.check_run_dir(self.run_dir, config.resume, config.overwrite)
        if self.dist.is_main:
            self.lock.acquire()  # held until the run ends; a second run into this directory is refused
            outputs = [self.task.output_path(config, split).parent for split in ("dev", "test")]
            for directory in (self.run_dir, *outputs):
                check_writable(directory)  # now, not after the first epoch
            for stale in ckpt.remove_stale_temp_files(self.run_dir):
                self.say(f"  removed {stale}, left by an interrupted write")
        # A checkpoint of another run is refused before minutes go into loading the model and the data.
        resume = config.resume and not restart
        resume_state = ckpt.load_checkpoint(ckpt.checkpoint_path(self.run_dir), self.identity()) if resume else None
        self.dist.barrier()
        self.tokenizer = GPT2Tokenizer.from_pretrained(tokenizer_source(config))
        self.build_model()  # loads the data too
        if resume_state is not None:  # the same settings (checked above), but also the same data and tokenizer?
            ckpt.check_fingerprints(ckpt.checkpoint_path(self.run_dir), resume_state, self.fingerprints,
                                    self.fingerprint_sources())
        if restart and self.dist.is_main:  # the new run's inputs are good: only now do the old run's files go
            if config.resume:
                self.say(f"  {self.run_dir} has no checkpoint yet (the run stopped before its first one): starting "
                         "it again from the beginning")
            ckpt.clear_run_dir(self.run_dir)
        if self.layer_choices:
            self.report_layer_choices()
        self.dist.barrier()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.cache = feature_cache.attach(self.model, self.gpt, config.cache, config.cache_memory, self.run_dir, self.say)
        self.summary = parameter_summary(self.model)
        if not self.params:
            raise ValueError(f"--method {config.method_name} leaves nothing to train on task {self.task.name}")
        part_lrs = [(config.part_learning_rate(part), params) for part, params in trainable_by_method(self.gpt)]
        self.optimizer = build_optimizer(self.model, config.learning_rate, config.weight_decay, part_lrs)
        self.steps_per_epoch = math.ceil(math.ceil(len(self.splits["train"]) / config.batch_size) / config.grad_accum)
        # A step budget sets the epochs (the last one may be partial) and the length of the schedule.
        self.epochs = math.ceil(config.budget_steps / self.steps_per_epoch) if config.budget_steps else config.epochs
        total = config.budget_steps or self.steps_per_epoch * self.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_then_decay(total, round(config.warmup_ratio * total)))
        self.loss_module = self.dist.wrap(LossModule(self.task, self.model), self.device)
        self.say(f"{self.task.name} / {config.method_name}: {format_parameter_summary(self.model)}")
        self.say(f"  {len(self.splits['train'])} train, {len(self.splits['dev'])} dev, {len(self.splits['test'])} test "
                 f"examples; {self.epochs} epoch{'s' if self.epochs > 1 else ''} of {self.steps_per_epoch} steps (batch {config.batch_size} x "
                 f"{config.grad_accum} accumulation); lr {describe_learning_rates(config)}; {self.device} {self.precision}"
                 + (f"; {self.dist.world_size} processes" if self.dist.enabled else "")
                 + (f"; budget {config.budget}" if config.budget_steps or config.budget_seconds else ""))
        for note in self.data_notes:
            self.say(note)
        if resume_state is not None:
            self.restore(resume_state)
        if self.dist.is_main:
            self.step_log = StepLog(self.run_dir, config.log_every, config.tensorboard, self.progress.step)

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
        self.gpt = gpt
        self.load_data()  # before the method: --layers auto:K probes the frozen model on the data
        method, self.layer_choices = resolve_auto_layers(self.task, gpt, self.splits, config.method, config.seed,
                                                        self.device, config.eval_batch_size)
        apply_method(gpt, method, tokenizer=self.tokenizer)  # the tokenizer turns text options into ids
        self.model = self.task.build_model(gpt, self.tokenizer).to(self.device)
        self.gpt = gpt.set_precision(self.precision)

    def report_layer_choices(self) -> None:
        """One line per K asked for (a combination's parts may each ask their own), from one set of scores."""
        for choice in self.layer_choices:
            self.say(f"  --layers auto:{len(choice.chosen)}: layers {', '.join(map(str, choice.chosen))} by "
                     f"{choice.criterion} ({', '.join(f'{score:.3g}' for score in choice.scores)} for layers 0..)")
        if self.dist.is_main:
            path = self.run_dir / "layer_scores.png"
            asked = ", ".join(f"auto:{len(choice.chosen)}" for choice in self.layer_choices)
            title = f"{self.task.name}, {self.config.model}: layer scores for --layers {asked}"
            widest = max(self.layer_choices, key=lambda choice: len(choice.chosen))  # holds every other K's layers
            if plot_layer_scores(path, widest, title):
                self.layer_plot = str(path)

    def load_data(self) -> None:
        config = self.config
        # The data are read before the method is applied (build_model): leave room for its virtual tokens, if any.
        virtual_length = virtual_positions(config.method)
        context = self.gpt.config.n_positions - virtual_length
        if config.max_length is not None and config.max_length > context:
            virtual = f" after the method's {virtual_length} virtual tokens" if virtual_length else ""
            raise ValueError(f"--max-length {config.max_length} exceeds the context of the model {config.model} "
                             f"({context} tokens{virtual})")
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
        self.data_paths = data.paths
        # What a resume must find unchanged besides the settings (the dev examples may change with
        # --max-eval-examples, as the other evaluation settings may).
        self.fingerprints = {"tokenizer": self.tokenizer.fingerprint(), "train": examples_fingerprint(self.splits["train"])}

    def fingerprint_sources(self) -> dict[str, str]:
        """What each fingerprint is of, in words, for the message of a resume that finds it changed."""
        return {"tokenizer": f"the tokenizer ({tokenizer_source(self.config)})",
                "train": f"the training examples ({self.data_paths['train']})"}

    def identity(self) -> dict:
        """Settings a resumed run must share with the checkpoint, or its result would be a different run's."""
        c = self.config
        return {"task": c.task, "model": c.model, "method": method_to_json(c.method), "seed": c.seed, "epochs": c.epochs,
                "lr": c.learning_rate, "batch_size": c.batch_size, "grad_accum": c.grad_accum,
                "warmup_ratio": c.warmup_ratio, "weight_decay": c.weight_decay, "max_grad_norm": c.max_grad_norm,
                "max_length": c.max_length, "max_train_examples": c.max_train_examples, "dropout": c.dropout,
                "cache": c.cache, "budget_steps": c.budget_steps, "budget_seconds": c.budget_seconds}

    # ---- checkpoints
    def save_resume_checkpoint(self) -> None:
        rng = self.dist.gather([ckpt.rng_state(self.device)])
        if not self.dist.is_main:
            return
        ckpt.save_checkpoint(ckpt.checkpoint_path(self.run_dir), {
            "identity": self.identity(),
            "fingerprints": self.fingerprints,
            "trainable": trained_tensors(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng,
            "progress": asdict(self.progress),
            "best": asdict(self.best),
            "history": self.history,
        })

    def restore(self, state: dict) -> None:
        """Continues from `state` (load_checkpoint checked that it has every entry); a damaged entry is a
        ResumeError naming the checkpoint and the entry."""
        path = ckpt.checkpoint_path(self.run_dir)
        progress, best = Progress.from_dict(state["progress"], path), ckpt.record_from(Best, state["best"], path, "best")
        if not isinstance(state["history"], list):
            raise ckpt.ResumeError(ckpt.damaged(path, "its 'history' entry is not a list"))

        def restore_rng(rng: list) -> None:
            ckpt.restore_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0], self.device)

        for key, restore in (("trainable", lambda tensors: ckpt.restore_trainable(self.model, tensors, path)),
                             ("optimizer", self.optimizer.load_state_dict),
                             ("scheduler", self.scheduler.load_state_dict), ("rng", restore_rng)):
            try:
                restore(state[key])
            except ckpt.ResumeError:
                raise
            except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
                raise ckpt.ResumeError(ckpt.damaged(path, f"its {key!r} entry does not fit this run ({error!r})")) from None
        self.progress, self.best, self.history = progress, best, list(state["history"])
        self.say(f"  resumed from {path}: epoch {self.progress.epoch + 1}, step {self.progress.step}")

    def write_log(self, final: Optional[dict] = None) -> None:
        if not self.dist.is_main:
            return
        log = {"task": self.task.name, "status": self.status, "config": self.config.to_dict(),
               "fingerprints": self.fingerprints, "parameters": self.summary, "precision": self.precision, "device": str(self.device),
               "world_size": self.dist.world_size, "best_epoch": self.best.epoch,
               "best_dev_metric": self.best.metric, "metric": self.task.metric, "epochs": self.history}
        if self.cache is not None:
            log["cache"] = self.cache.stats()
        if self.layer_choices:  # the first K asked; chosen_by_k has every K's layers
            log["layer_choice"] = {**self.layer_choices[0].to_dict(), "plot": self.layer_plot,
                                   "chosen_by_k": {str(len(c.chosen)): c.chosen for c in self.layer_choices}}
        if final is not None:
            log["final"] = final
        atomic_save(lambda temp: Path(temp).write_text(json.dumps(log, indent=2) + "\n"), self.run_dir / "log.json")

    # ---- the loop
    def train(self) -> None:
        config = self.config
        while not self.done():
            epoch, progress = self.progress.epoch, self.progress
            self.train_epoch(epoch)
            loss_sum, terms, tokens = self.dist.all_reduce_sum([progress.loss_sum, progress.terms, progress.tokens],
                                                               self.device)
            entry = {"epoch": epoch + 1, "train_loss": loss_sum / max(terms, 1), "train_seconds": progress.seconds,
                     "train_tokens": int(tokens), "train_tokens_per_second": tokens / max(progress.seconds, 1e-9),
                     "grad_norm": progress.grad_norm_sum / max(progress.epoch_steps, 1),
                     "lr": max(self.scheduler.get_last_lr()), "step": progress.step}
            if (epoch + 1) % config.eval_every == 0 or epoch + 1 == self.epochs or self.budget_spent():
                entry.update(self.evaluate_epoch(epoch))
            self.history.append(entry)
            if self.step_log is not None:
                self.step_log.epoch(entry)
            self.say(f"epoch {epoch + 1}/{self.epochs}: train loss {entry['train_loss']:.4f}"
                     + (f", dev {self.task.describe(entry['dev'])}" if entry.get("dev") else "")
                     + f" ({entry['train_seconds']:.1f} s, {entry['train_tokens_per_second']:.0f} tokens/s)")
            if self.cache is not None:
                self.say(self.cache.describe())
            self.progress = progress.next_epoch()
            if self.done() and self.status == "early stopping":
                self.say(f"early stopping: no better dev {self.task.metric} for {config.patience} evaluations")
            self.write_log()
            self.save_resume_checkpoint()

    def done(self) -> bool:
        if self.config.patience is not None and self.best.stale >= self.config.patience:
            self.status = "early stopping"
        return self.status != "running" or self.progress.epoch >= self.epochs or self.budget_spent()

    def budget_spent(self) -> bool:
        """Whether --budget-steps or --budget-seconds (training time of the finished epochs and this one) is used up."""
        config, progress = self.config, self.progress
        if config.budget_steps is not None:
            return progress.step >= config.budget_steps
        if config.budget_seconds is not None:
            return sum(e["train_seconds"] for e in self.history) + progress.seconds >= config.budget_seconds
        return False

    def train_epoch(self, epoch: int) -> None:
        config, train = self.config, self.splits["train"]
        batches = bucketed_batches([e.length for e in train], config.batch_size, config.seed, epoch)
        groups = [batches[i:i + config.grad_accum] for i in range(0, len(batches), config.grad_accum)]
        first_group = self.progress.batch // config.grad_accum
        self.model.train()
        with self.bar(total=len(groups), initial=first_group, desc=f"epoch {epoch + 1}/{self.epochs}") as bar:
            for group in groups[first_group:]:
                start = time.perf_counter()
                step_loss = self.train_step(group, train)
                self.progress.seconds += time.perf_counter() - start
                self.progress.batch += len(group)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", refresh=False)
                if config.save_every_steps and self.progress.step % config.save_every_steps == 0 \
                        and self.progress.batch < len(batches):
                    self.save_resume_checkpoint()
                if self.budget_spent():
                    break

    def train_step(self, group: list[list[int]], train: list[Example]) -> float:
        """One optimizer step over `group` (grad_accum micro-batches of the global batch); returns its mean loss."""
        task, dist = self.task, self.dist
        start, tokens_before, lr = time.perf_counter(), self.progress.tokens, max(self.scheduler.get_last_lr())
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
                self.progress.tokens += sum(e.length for e in examples)
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
        progress = self.progress
        progress.step += 1
        progress.epoch_steps += 1
        progress.grad_norm_sum += grad_norm
        progress.loss_sum += local_sum
        progress.terms += local_terms
        if self.step_log is not None:  # this process's loss and tokens; the gradient norm is the global one
            self.step_log.step(progress.step, {
                "epoch": progress.epoch + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                "tokens_per_second": (progress.tokens - tokens_before) / max(time.perf_counter() - start, 1e-9)})
        return step_loss

    def diverged(self, loss: float, grad_norm: float) -> None:
        self.status = "diverged"
        self.write_log()
        hints = "lower --lr, raise --warmup-ratio or keep --max-grad-norm" + (
            ", or try --precision fp32" if self.precision == "bf16" else "")
        best = f" The best checkpoint so far is in {self.run_dir / 'best'}." if self.best.epoch is not None else ""
        raise TrainingDiverged(
            f"training stopped: the loss ({loss:.4g}) or its gradient (norm {grad_norm:.4g}) is not finite at epoch "
            f"{self.progress.epoch + 1}, step {self.progress.step + 1}; {hints}.{best}"
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
        if value is None or self.best.metric is None or value > self.best.metric:
            self.save_best(epoch, value)
        else:
            self.best.stale += 1
        return {"dev": metrics, "dev_seconds": seconds, "best": self.best.epoch == epoch + 1}

    def save_best(self, epoch: int, value: Optional[float]) -> None:
        """Keeps this epoch's model as the best (with no dev metric to compare, the latest is the best)."""
        self.best = Best(metric=value, epoch=epoch + 1)
        if self.dist.is_main:
            save_adapter(self.model, self.run_dir / "best")

    # ---- the end
    def reload_best(self) -> Path:
        """Loads the best adapter into the model (once rank 0 has written it) and returns its directory."""
        best_dir = self.run_dir / "best"
        self.dist.barrier()
        if (best_dir / ADAPTER_CONFIG).is_file():
            load_adapter(self.model, best_dir, trainable=True)  # what trained stays trainable
        return best_dir

    def final_predictions(self, split: str) -> tuple[list, float]:
        """The best model's predictions for a split and their seconds: the newest dev evaluation when that was
        of the best model (the one now loaded), else a new pass."""
        latest = self.latest_dev
        if split == "dev" and latest is not None and latest[0] == self.best.epoch \
                and self.history and self.history[-1]["epoch"] == self.best.epoch:
            return latest[1], latest[2]
        return self.predict(split)

    def write_final_predictions(self) -> tuple[dict, dict, Optional[float]]:
        """Writes the dev and test prediction files; returns (their paths, the dev metrics, seconds per dev
        example)."""
        paths, dev_metrics, seconds_per_example = {}, {}, None
        for split in ("dev", "test"):
            examples = self.splits[split]
            if not examples:
                continue
            predictions, seconds = self.final_predictions(split)
            path = self.task.output_path(self.config, split)
            if self.dist.is_main:
                self.task.write_output(self.config, path, examples, predictions)
            paths[f"{split}_predictions"] = str(path)
            if split == "dev":
                dev_metrics = self.task.metrics(examples, predictions)
                seconds_per_example = seconds / len(examples)
        return paths, dev_metrics, seconds_per_example

    def result(self, best_dir: Path, paths: dict, dev_metrics: dict, seconds_per_example: Optional[float],
               peak_memory: int) -> RunResult:
        epoch_seconds = [entry["train_seconds"] for entry in self.history]
        tokens = sum(entry["train_tokens"] for entry in self.history)
        return RunResult(
            task=self.task.name, method=method_to_json(self.config.method),
            method_name=self.config.method_name, best_epoch=self.best.epoch,
            best_dev_metric=dev_metrics.get(self.task.metric), metric=self.task.metric, dev_metrics=dev_metrics,
            epochs=self.history, stopped=self.status, trainable_params=self.summary["trainable"],
            total_params=self.summary["total"],
            adapter_bytes=adapter_file_size(best_dir) if (best_dir / ADAPTER_CONFIG).is_file() else 0,
            epoch_seconds=epoch_seconds, train_tokens_per_second=tokens / max(sum(epoch_seconds), 1e-9),
            peak_memory_bytes=peak_memory, inference_seconds_per_example=seconds_per_example,
            precision=self.precision, device=str(self.device), world_size=self.dist.world_size,
            paths={"run_dir": str(self.run_dir), "log": str(self.run_dir / "log.json"), "best": str(best_dir),
                   "checkpoint": str(ckpt.checkpoint_path(self.run_dir)), **paths},
        )

    def report(self, result: RunResult) -> None:
        score = f"dev {self.task.describe(result.dev_metrics)}" if result.dev_metrics else "no dev labels"
        predictions = [v for k, v in result.paths.items() if k.endswith("predictions")]
        self.say(f"{self.task.name} / {self.config.method_name}: {score} (best epoch {result.best_epoch}, "
                 f"{result.stopped}); {result.trainable_params:,} trainable params; predictions: "
                 + (", ".join(predictions) or "none"))

    def finish(self, already_finished: bool) -> RunResult:
        """The best model's predictions, the final log entry, the result."""
        best_dir = self.reload_best()
        if self.cache is not None:
            self.cache.storing = False  # the final predictions run once: what they compute is not kept
        paths, dev_metrics, seconds_per_example = self.write_final_predictions()
        if self.status == "running":
            self.status = "already finished" if already_finished else "finished"
        peak_memory = peak_memory_bytes(self.device)
        self.write_log(final={"dev": dev_metrics, "predictions": paths, "peak_memory_bytes": peak_memory,
                              "inference_seconds_per_example": seconds_per_example})
        result = self.result(best_dir, paths, dev_metrics, seconds_per_example, peak_memory)
        if self.dist.is_main:
            plot_run(self.run_dir, self.history, self.task.metric, f"{self.task.name} / {self.config.method_name}")
        self.report(result)
        return result

    def run(self) -> RunResult:
        try:
            self.setup()
            already_finished = self.done()
            try:
                self.train()
            except KeyboardInterrupt:
                self.status = "interrupted"  # the log says so; --resume continues from the last checkpoint
                self.write_log()
                raise
            except Exception as error:
                if self.status == "running":  # the log must not go on saying so (diverged runs say that)
                    self.status = "failed"
                    try:
                        self.write_log(final={"error": f"{type(error).__name__}: {error}"})
                    except OSError:
                        pass  # a full disk may refuse the log too: the error to report is the first one
                raise
            return self.finish(already_finished)
        finally:
            if self.cache is not None:
                feature_cache.detach(self.gpt, self.cache)
            if self.step_log is not None:
                self.step_log.close()
            self.lock.release()


def run_training(task: Union[str, Task], config: TrainConfig) -> RunResult:
    """Trains, evaluates and writes predictions for one task with one method; what the scripts and compare.py
    call (tasks.cli.parse_args builds the config from a script's flags)."""
    task = tasks.get_task(task) if isinstance(task, str) else task
    if config.task != task.name:
        raise ValueError(f"run_training: config is for task {config.task!r}, not {task.name!r}")
    started = not torch.distributed.is_initialized()
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    dist, device = setup_distributed(config.device)
    try:
        return Trainer(task, config, dist, device).run()
    finally:
        torch.set_num_threads(threads)  # compare.py runs several methods in one process
        if started:
            teardown_distributed()
