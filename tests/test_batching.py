"""tasks.batching: length-bucketed batches for training (every example once per epoch, a function of seed
and epoch only, little padding, random order) and sorted batches for evaluation."""
from __future__ import annotations

import math

import pytest
import torch

from models.tokenizer import pad_sequences as pad
from tasks.batching import bucketed_batches, sorted_batches

pytestmark = pytest.mark.usefixtures("one_thread")


def test_bucketed_batches_hold_every_example_exactly_once_per_epoch():
    lengths = [(i * 37) % 101 + 1 for i in range(1003)]
    for epoch in range(3):
        batches = bucketed_batches(lengths, batch_size=8, seed=5, epoch=epoch, bucket_batches=10)
        flat = [i for batch in batches for i in batch]
        assert sorted(flat) == list(range(len(lengths)))
        assert all(1 <= len(batch) <= 8 for batch in batches)
        assert sum(len(batch) < 8 for batch in batches) <= 1
        assert len(batches) == math.ceil(len(lengths) / 8)


def test_bucketed_batches_depend_on_seed_and_epoch_only():
    lengths = list(range(1, 300))
    assert bucketed_batches(lengths, 4, seed=1, epoch=0) == bucketed_batches(lengths, 4, seed=1, epoch=0)
    assert bucketed_batches(lengths, 4, seed=1, epoch=0) != bucketed_batches(lengths, 4, seed=1, epoch=1)
    assert bucketed_batches(lengths, 4, seed=1, epoch=0) != bucketed_batches(lengths, 4, seed=2, epoch=0)


def test_bucketing_pads_far_less_than_random_batches_but_keeps_the_order_random():
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 120, (4000,), generator=generator).tolist()

    def padding(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    bucketed = bucketed_batches(lengths, 16, seed=0, epoch=0)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    random_batches = [order[i:i + 16] for i in range(0, len(order), 16)]
    assert padding(bucketed) < 0.1 * padding(random_batches)
    # Batch lengths are not sorted across the epoch: consecutive batches go up and down.
    longest = [max(lengths[i] for i in b) for b in bucketed]
    rises = sum(b > a for a, b in zip(longest, longest[1:]))
    assert 0.3 < rises / (len(longest) - 1) < 0.7


def test_sorted_batches_and_pad():
    batches = sorted_batches([3, 1, 4, 1, 5], batch_size=2)
    assert batches == [[4, 2], [0, 1], [3]]
    ids, mask = pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
