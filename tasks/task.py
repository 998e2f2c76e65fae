"""What the shared training loop needs from a task: its data, pre-tokenised once; its model around GPT-2; a
summed loss over a batch; predictions, metrics and prediction files. The loop never branches on the task,
and no task branches on the fine-tuning method."""
from __future__ import annotations

import hashlib
import sys
from abc import ABC, abstractmethod
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from models.methods import MethodConfig, combination_name, method_parts, registered_methods
from tasks.config import TrainConfig

SPLITS = ("train", "dev", "test")


@dataclass
class Example:
    id: str
    input_ids: list[int]
    label: Any = None  # a class index; for sonnets the true full text; None when the file has no answers
    prompt_length: Optional[int] = None  # sonnets: the tokens interventions act on (the first three lines)
    text: Optional[str] = None  # sonnet prompts: the text a generated continuation is appended to

    @property
    def length(self) -> int:
        return len(self.input_ids)


def examples_fingerprint(examples: Sequence[Example]) -> str:
    """A sha256 of what training reads of each example (id, token ids, label, prompt length), in order: other rows
    under the same file name, or the same rows tokenised otherwise, give another fingerprint."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(repr((example.id, example.label, example.prompt_length, example.length)).encode("utf-8"))
        tokens = array("q", example.input_ids)
        if sys.byteorder == "big":  # the same fingerprint on every machine
            tokens.byteswap()
        digest.update(tokens.tobytes())
    return digest.hexdigest()


@dataclass
class TaskData:
    splits: dict[str, list[Example]]
    paths: dict[str, Path]  # where each split was read from, for messages
    truncated: dict[str, int] = field(default_factory=dict)  # texts cut to fit the model context, per split
    notes: list[str] = field(default_factory=list)  # what the user should know about the data (printed once)


class Task(ABC):
    name: str
    metric: str  # the dev metric that picks the best checkpoint (higher is better)
    no_head: Optional[str] = None  # why the task has no trainable head of its own; None: it has one

    def check_method(self, method: MethodConfig | list[MethodConfig]) -> None:
        """Raises ValueError when the method (or combination) cannot train anything on this task: one that trains
        only a task's head, on a task without one."""
        if self.no_head is not None and not any(part.spec.adapts_gpt2 for part in method_parts(method)):
            adapting = ", ".join(m.name for m in registered_methods() if m.adapts_gpt2)
            raise ValueError(f"--method {combination_name(method)} trains only a task head, and the {self.name} task "
                             f"has none ({self.no_head}); choose one of {adapting}")

    @abstractmethod
    def load(self, config: TrainConfig, tokenizer, max_length: int) -> TaskData:
        """Reads the train / dev / test splits and tokenises the first `config.example_limit(split)` examples of
        each (a test split is empty when its file is absent)."""

    @abstractmethod
    def build_model(self, gpt: nn.Module, tokenizer) -> nn.Module:
        """The task model around `gpt`, after the method has been applied to it; new parts are trainable."""

    @abstractmethod
    def collate(self, examples: Sequence[Example], device: torch.device) -> dict[str, torch.Tensor]:
        """A training batch as tensors."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss summed (not averaged) over the batch's loss terms: the trainer divides by the number of
        terms in the whole global batch, so that micro-batches and ranks add up to the true mean."""

    def loss_terms(self, example: Example) -> int:
        """How many terms one example adds to the summed loss (one per classified example)."""
        return 1

    @abstractmethod
    def predict(self, model: nn.Module, examples: Sequence[Example], config: TrainConfig, device: torch.device,
                progress=None) -> list:
        """Predictions for `examples`, in order (model in eval mode, no gradients); `progress.update(n)` is
        called as examples are done, when given (a tqdm bar)."""

    @abstractmethod
    def metrics(self, examples: Sequence[Example], predictions: list) -> dict[str, float]:
        """Scores against the labels; {} when the examples have none."""

    @abstractmethod
    def prediction_path(self, config: TrainConfig, split: str) -> Path:
        ...

    @abstractmethod
    def write_predictions(self, path: Path, examples: Sequence[Example], predictions: list) -> None:
        """Writes a prediction file in the course's format, atomically."""

    def output_path(self, config: TrainConfig, split: str) -> Path:
        """Where a split's predictions go: the file the config names for it (the course's --para_dev_out and
        friends), else the course's name with `course_names`, else this project's `prediction_path`."""
        from data.course import course_mode, course_prediction_path

        if split in config.prediction_files:
            return Path(config.prediction_files[split])
        if config.course_names:
            mode = course_mode(config.method_family)
            return course_prediction_path(self.name, mode, split, config.predictions_dir)
        return self.prediction_path(config, split)

    def write_output(self, config: TrainConfig, path: Path, examples: Sequence[Example], predictions: list) -> None:
        """`write_predictions`, with the course's label values when `config.course_names`."""
        from data.course import course_values

        self.write_predictions(path, examples, course_values(self.name, predictions) if config.course_names
                               else predictions)

    def describe(self, metrics: dict[str, float]) -> str:
        return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
