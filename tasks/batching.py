"""Batches of pre-tokenised examples: length-bucketed for training, length-sorted for evaluation (padding them
is models.tokenizer.pad_sequences).

Padding is wasted work on a CPU, so training batches group examples of similar length: the shuffled data set
is cut into chunks of `bucket_batches` batches, each chunk is sorted by length and cut into batches, and the
batch order is shuffled. Every example appears exactly once per epoch; the order depends only on the seed
and the epoch, so every distributed rank (and a resumed run) rebuilds exactly the same batches.
"""
from __future__ import annotations

from typing import Sequence

import torch

BUCKET_BATCHES = 50


def bucketed_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                     bucket_batches: int = BUCKET_BATCHES) -> list[list[int]]:
    """Indices into `lengths`, grouped into training batches of at most `batch_size`, for one epoch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), chunk):
        # sorted() is stable, so ties keep their shuffled order.
        by_length = sorted(order[start:start + chunk], key=lambda i: lengths[i])
        batches.extend(by_length[i:i + batch_size] for i in range(0, len(by_length), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: longest first (a memory problem shows up at once), no shuffling."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_seed(seed: int, epoch: int) -> int:
    # Distinct epochs (and distinct seeds) give unrelated permutations.
    return (seed * 1_000_003 + epoch) % (2**63)
