"""Classifying a text by GPT-2's hidden state at its last token: what sentiment and paraphrase detection share."""
from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from torch import nn

from data.readers import write_predictions
from models.tokenizer import pad_sequences
from tasks.batching import sorted_batches
from tasks.config import TrainConfig
from tasks.task import SPLITS, Example, Task, TaskData


class LastTokenClassifier(nn.Module):
    """GPT-2 and a linear head on the hidden state of each row's last real token."""

    def __init__(self, gpt: nn.Module, num_labels: int, init_weight: Optional[torch.Tensor] = None):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, num_labels)
        self.head_dropout = nn.Dropout(0.0)  # off unless set: see set_head_dropout
        if init_weight is not None:
            with torch.no_grad():
                self.head.weight.copy_(init_weight)
                self.head.bias.zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and mask -> (B, num_labels) fp32 logits. The head stays fp32 whatever the precision.
        `gpt.last_token` skips the gradient work a method training only last-token interventions does not need."""
        last = self.gpt.last_token(input_ids, attention_mask)
        return self.head(self.head_dropout(last.float()))

    def set_head_dropout(self, rate: float) -> None:
        """Dropout on the head's input (the course's classifier has it); the frozen-part cache
        (tasks/feature_cache.py) turns it on when it turns dropout off in the frozen layers."""
        self.head_dropout.p = rate


class ClassificationTask(Task):
    """Subclasses say how to read a file's rows and how to turn a row into token ids."""

    num_labels: int
    prediction_column: str
    file_stem: str  # predictions/<method>-<file_stem>-<split>-out.csv

    @abstractmethod
    def read_rows(self, path: Path, require_labels: bool) -> list:
        """The rows of one data file (objects with `.id` and `.label`), via data.readers."""

    @abstractmethod
    def encode_row(self, tokenizer, row, max_length: int) -> tuple[list[int], bool]:
        """(token ids of the row's prompt, whether it was cut to max_length)."""

    def load(self, config: TrainConfig, tokenizer, max_length: int) -> TaskData:
        paths = config.data_paths()
        splits, truncated = {}, {}
        for split in SPLITS:
            splits[split], truncated[split] = [], 0
            if split == "test" and not paths[split].is_file():
                continue  # test files have no labels and are optional (Quora's is not distributed)
            rows = self.read_rows(paths[split], require_labels=split != "test")
            for row in rows[:config.example_limit(split)]:  # only what is used gets tokenised
                ids, cut = self.encode_row(tokenizer, row, max_length)
                label = None if row.label is None else int(row.label)
                splits[split].append(Example(id=row.id, input_ids=ids, label=label))
                truncated[split] += cut
        return TaskData(splits=splits, paths={split: paths[split] for split in SPLITS}, truncated=truncated)

    def prediction_path(self, config: TrainConfig, split: str) -> Path:
        return Path(config.predictions_dir) / f"{config.method_label}-{self.file_stem}-{split}-out.csv"

    def write_predictions(self, path: Path, examples: Sequence[Example], predictions: list) -> None:
        write_predictions(path, self.prediction_column, [e.id for e in examples], predictions)

    def collate(self, examples: Sequence[Example], device: torch.device) -> dict[str, torch.Tensor]:
        ids, mask = pad_sequences([e.input_ids for e in examples], device=device)
        labels = torch.tensor([e.label for e in examples], dtype=torch.long, device=device)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = model(batch["input_ids"], batch["attention_mask"])
        return F.cross_entropy(logits, batch["labels"], reduction="sum")

    @torch.no_grad()
    def predict(self, model: nn.Module, examples: Sequence[Example], config: TrainConfig, device: torch.device,
                progress=None) -> list[int]:
        was_training = model.training
        model.eval()
        predictions: list[Optional[int]] = [None] * len(examples)
        try:
            for indices in sorted_batches([e.length for e in examples], config.eval_batch_size):
                ids, mask = pad_sequences([examples[i].input_ids for i in indices], device=device)
                for i, label in zip(indices, model(ids, mask).argmax(-1).tolist()):
                    predictions[i] = label
                if progress is not None:
                    progress.update(len(indices))
        finally:
            model.train(was_training)
        return predictions

    def metrics(self, examples: Sequence[Example], predictions: list) -> dict[str, float]:
        if not examples or any(e.label is None for e in examples):
            return {}
        labels = [e.label for e in examples]
        return {
            "accuracy": float(accuracy_score(labels, predictions)),
            # Macro-F1 for every task, as the course's evaluation computes it (Quora's included).
            "macro_f1": float(f1_score(labels, predictions, average="macro", zero_division=0)),
        }
