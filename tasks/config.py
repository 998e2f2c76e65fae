"""Everything one training run needs to know, as one dataclass: built by the command line (tasks/cli.py) or
directly by code such as compare.py."""
from __future__ import annotations

import dataclasses
import numbers
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from data.readers import TASK_FILES, default_paths
from models.gpt2 import PRECISION_CHOICES
from models.methods import MethodConfig, combination_name, method_from_json, method_parts, method_to_json
from models.registry import path_label
from models.peft import check_combination

GENERATION_FIELDS = ("temperature", "top_p", "max_new_tokens")  # used by the sonnet task only
SEED_RANGE = (-2**63, 2**64 - 1)  # what torch.manual_seed and torch.Generator.manual_seed accept


def optimizer_problems(lr: Optional[float], warmup_ratio: float, weight_decay: float,
                       max_grad_norm: Optional[float]) -> list[str]:
    """What is wrong with the optimizer and schedule settings a training run and pretraining share (lr None:
    the method's default)."""
    problems = []
    if lr is not None and not lr > 0:
        problems.append(f"lr must be > 0, got {lr}")
    if not 0 <= warmup_ratio < 1:
        problems.append(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    if weight_decay < 0:
        problems.append(f"weight_decay must be >= 0, got {weight_decay}")
    if max_grad_norm is not None and not max_grad_norm > 0:
        problems.append(f"max_grad_norm must be > 0 (or unset), got {max_grad_norm}")
    return problems


def seed_problem(seed) -> Optional[str]:
    """Why `seed` cannot seed torch's generators, or None: outside SEED_RANGE torch stops with a C-level error."""
    low, high = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, int) or not low <= seed <= high:
        return f"must be an integer from -2**63 to 2**64 - 1 (what torch's random generators accept), got {seed!r}"
    return None


def type_problems(config) -> list[str]:
    """What is of the wrong type among a dataclass's fields, judged by their annotations (int, float, str, bool,
    dict, Optional[...]): code building a TrainConfig by hand gets the field named, not a TypeError from deep in
    a comparison. What passes is stored as the plain type (a Path given for data_dir as str, also as a value of
    data_files; numpy's numbers and bools as int, float or bool; a whole float such as 2e9 bytes as int), so the
    config stays JSON."""
    problems, hints = [], typing.get_type_hints(type(config))
    for f, hint in ((f, hints[f.name]) for f in dataclasses.fields(config)):
        allowed = [t for t in (typing.get_args(hint) or (hint,)) if t in FIELD_TYPES]
        if not allowed:  # a field of another kind (the method) checks itself
            continue
        optional, value = type(None) in typing.get_args(hint), getattr(config, f.name)
        if value is None and optional:
            continue
        kind = next((t for t in allowed if FIELD_TYPES[t](value)), None)
        if kind is None:
            names = " or ".join(t.__name__ for t in allowed) + (" (or unset)" if optional else "")
            problems.append(f"{f.name} must be {names}, got {value!r} ({type(value).__name__})")
        elif kind is dict:  # data_files, prediction_files: split -> path
            wrong = {k: v for k, v in value.items() if not FIELD_TYPES[str](v)}
            if wrong:
                problems.append(f"{f.name} must map splits to paths, got {wrong!r}")
            else:
                setattr(config, f.name, {k: os.fspath(v) for k, v in value.items()})
        else:
            setattr(config, f.name, kind(os.fspath(value) if isinstance(value, os.PathLike) else value))
    return problems


def labelled_directory(parent: Path, name: str) -> Path:
    """parent / path_label(name): a run or variant directory named after a method or variant. Where only the
    directory spelt with the name's ':' exists (written before paths spelt it '-'), that one, so that such a run
    still resumes."""
    labelled, verbatim = Path(parent) / path_label(name), Path(parent) / name
    return verbatim if verbatim != labelled and verbatim.is_dir() and not labelled.exists() else labelled


def is_bool(value) -> bool:
    return isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"))


FIELD_TYPES = {  # annotation -> whether a value can be stored as it (a bool is no int here, though Python makes it one)
    int: lambda v: not is_bool(v) and (isinstance(v, numbers.Integral) or isinstance(v, float) and v.is_integer()),
    float: lambda v: not is_bool(v) and isinstance(v, numbers.Real),
    str: lambda v: isinstance(v, (str, os.PathLike)),
    bool: is_bool,
    dict: lambda v: isinstance(v, dict),
}


@dataclass
class TrainConfig:
    task: str  # sst, cfimdb, quora or sonnet
    # One method, or a combination: a list of MethodConfigs, one per part (models/registry.py).
    method: Union[MethodConfig, list[MethodConfig]] = field(default_factory=MethodConfig)
    model: str = "gpt2"  # hub name, local checkpoint directory, or random:<size>
    tokenizer: Optional[str] = None  # None: the model directory if it holds vocab.json, else the hub's gpt2
    data_dir: str = "data"
    output_dir: Optional[str] = None  # None: runs/<task>-<method>
    predictions_dir: str = "predictions"
    # Per-split overrides, as the course's flags give them (--para_train, --sonnet_out, ...): split -> path.
    data_files: dict = field(default_factory=dict)  # train / dev / test / dev_true instead of data_dir's file
    prediction_files: dict = field(default_factory=dict)  # dev / test instead of the predictions_dir name
    course_names: bool = False  # predictions under the CS224n file names and label values (data/course.py)

    epochs: int = 10
    lr: Optional[float] = None  # None: the method's default (models/methods.py: 1e-5 for full, 1e-3 for the rest);
    #                             a combination's parts each train at their own (see part_learning_rate)
    batch_size: int = 8  # examples per micro-batch, over all ranks together
    grad_accum: int = 1  # micro-batches per optimizer step
    eval_batch_size: int = 32
    warmup_ratio: float = 0.1  # linear warmup over this fraction of the steps, then linear decay to zero
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0  # None: no clipping
    max_length: Optional[int] = None  # None: the model context
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    seed: int = 11711
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 on a GPU or a CPU with bf16 instructions, fp32 otherwise
    dropout: Optional[float] = None  # None: the checkpoint's (0.1 for GPT-2)
    cache: bool = True  # compute the frozen part below the first trainable layer once (tasks/feature_cache.py)
    cache_memory: Optional[int] = None  # bytes of RAM for that cache before it spills to disk; None: a quarter of RAM
    threads: Optional[int] = None  # torch's intra-op threads; None: torch's default

    # A budget every compared run shares (compare.py): stop at this many optimizer steps in all (the epochs then
    # follow from it and the learning-rate schedule spans it), or after this much training time (evaluation
    # excluded; --epochs stays the upper bound and spans the schedule). At most one of the two.
    budget_steps: Optional[int] = None
    budget_seconds: Optional[float] = None

    patience: Optional[int] = None  # stop after this many evaluations without a better dev metric
    eval_every: int = 1  # evaluate on dev every N epochs (and always after the last)
    save_every_steps: Optional[int] = None  # also write the resume checkpoint every N optimizer steps
    log_every: Optional[int] = 10  # step metrics to <run>/steps.jsonl every N optimizer steps (None: none)
    tensorboard: bool = False  # and to TensorBoard event files in <run>/tensorboard/ (needs tensorboard)
    resume: bool = False
    overwrite: bool = False

    # Generation (sonnet only: GENERATION_FIELDS): the course's sampling settings.
    temperature: float = 1.2
    top_p: float = 0.9
    max_new_tokens: int = 150

    def __post_init__(self):
        problems = type_problems(self)
        if self.task not in TASK_FILES and not problems:
            problems.append(f"unknown task {self.task!r}; choose one of {', '.join(TASK_FILES)}")
        if problems:  # before the checks below, which compare values of these types
            raise ValueError("; ".join(problems))
        self.method = method_from_json(self.method)
        check_combination(method_parts(self.method))
        problems = []
        for name in ("epochs", "batch_size", "grad_accum", "eval_batch_size", "eval_every", "max_new_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_length", "max_train_examples", "max_eval_examples", "patience", "save_every_steps",
                     "log_every", "budget_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1 (or unset), got {value}")
        if seed_problem(self.seed):
            problems.append(f"seed {seed_problem(self.seed)}")
        problems += optimizer_problems(self.lr, self.warmup_ratio, self.weight_decay, self.max_grad_norm)
        if self.cache_memory is not None and self.cache_memory < 0:
            problems.append(f"cache_memory must be >= 0 bytes (or unset), got {self.cache_memory}")
        if self.threads is not None and self.threads < 1:
            problems.append(f"threads must be >= 1 (or unset), got {self.threads}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.precision not in PRECISION_CHOICES:
            problems.append(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {self.precision!r}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        for name, known in (("data_files", ("train", "dev", "dev_true", "test")), ("prediction_files", ("dev", "test"))):
            unknown = sorted(set(getattr(self, name)) - set(known))
            if unknown:
                problems.append(f"{name} keys must be among {', '.join(known)}, got {', '.join(unknown)}")
        if self.budget_seconds is not None and not self.budget_seconds > 0:
            problems.append(f"budget_seconds must be > 0 (or unset), got {self.budget_seconds}")
        if self.budget_steps is not None and self.budget_seconds is not None:
            problems.append("budget_steps and budget_seconds exclude each other: give one budget")
        if self.resume and self.overwrite:
            problems.append("resume and overwrite exclude each other")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def method_name(self) -> str:
        """'lora', or 'lora+loreft' for a combination: how logs and tables name it (paths: method_label)."""
        return combination_name(self.method)

    @property
    def method_label(self) -> str:
        """method_name as run directories and prediction files spell it ('loreft-early+loreft-late')."""
        return path_label(self.method_name)

    @property
    def method_family(self) -> str:
        """The method's registry family (models/registry.py); a combination's, which is never head-only or full
        fine-tuning, is its first part's."""
        return method_parts(self.method)[0].spec.family

    def part_learning_rate(self, part: MethodConfig) -> float:
        """The peak learning rate of one method, or of one part of a combination: --lr when given, else the
        method's own default. Each part trains at its own, as it would alone."""
        return self.lr if self.lr is not None else part.spec.lr

    @property
    def learning_rate(self) -> float:
        """The peak learning rate of everything no part owns (a task's head): a single method's; for a
        combination the largest of its parts', so the head keeps up with the fastest-moving part."""
        return max(self.part_learning_rate(part) for part in method_parts(self.method))

    @property
    def budget(self) -> str:
        """Which budget stops the run, in words: '200 optimizer steps', '60 s of training' or '3 epochs'."""
        if self.budget_steps is not None:
            return f"{self.budget_steps} optimizer step" + ("s" if self.budget_steps != 1 else "")
        if self.budget_seconds is not None:
            return f"{self.budget_seconds:g} s of training (at most {self.epochs} epochs)"
        return f"{self.epochs} epoch" + ("s" if self.epochs != 1 else "")

    def example_limit(self, split: str) -> Optional[int]:
        """How many examples of a split to use (--max-train-examples / --max-eval-examples): the first N."""
        return self.max_train_examples if split == "train" else self.max_eval_examples

    def data_paths(self) -> dict[str, Path]:
        """The task's data files by split: data_dir's course file names, unless data_files names another."""
        return {**default_paths(self.task, self.data_dir), **{k: Path(v) for k, v in self.data_files.items()}}

    @property
    def run_dir(self) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        return labelled_directory(Path("runs"), f"{self.task}-{self.method_name}")

    def to_dict(self) -> dict:
        """JSON-ready; the generation settings only for the task that generates."""
        out = dataclasses.asdict(self)
        if self.task != "sonnet":
            for name in GENERATION_FIELDS:
                del out[name]
        out["method"] = method_to_json(self.method)
        out["method_name"] = self.method_name
        out["learning_rate"] = self.learning_rate
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainConfig":
        """The config of a run's log.json (`to_dict`'s output; fields a newer version added take their defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})
