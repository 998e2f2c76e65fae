"""Sentiment classification: SST-5 (5 classes) and CFIMDB (2), from GPT-2's hidden state at the last token."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from data.readers import SENTIMENT_COLUMN, SENTIMENT_LABELS, read_sentiment
from tasks.classification import ClassificationTask, LastTokenClassifier


class SentimentTask(ClassificationTask):
    metric = "accuracy"
    prediction_column = SENTIMENT_COLUMN

    def __init__(self, name: str):
        if name not in SENTIMENT_LABELS:
            raise ValueError(f"unknown sentiment data set {name!r}; choose one of {', '.join(SENTIMENT_LABELS)}")
        self.name = self.file_stem = name
        self.labels = SENTIMENT_LABELS[name]
        self.num_labels = len(self.labels)

    def read_rows(self, path: Path, require_labels: bool) -> list:
        return read_sentiment(path, labels=self.labels, require_labels=require_labels)

    def encode_row(self, tokenizer, row, max_length: int) -> tuple[list[int], bool]:
        """A text too long for the context keeps its end, the part the last token has just read (reviews tend
        to conclude there)."""
        ids = tokenizer.encode(row.text) or [tokenizer.eos_token_id]  # an empty text still needs one token
        if len(ids) <= max_length:
            return ids, False
        return ids[len(ids) - max_length:], True

    def build_model(self, gpt: nn.Module, tokenizer) -> nn.Module:
        return LastTokenClassifier(gpt, self.num_labels)
