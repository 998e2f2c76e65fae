"""modules.kv_cache: a forward pass in chunks through the cache equals the full one; the cache refuses more
positions than it holds."""
from __future__ import annotations

import pytest
import torch

from modules.kv_cache import KVCache
from tests.fixtures.models import left_and_right_padded, random_model


def test_cached_forward_equals_full_forward():
    model = random_model()
    rows, batches = left_and_right_padded(model.config.vocab_size, [6, 3])
    ids, mask = batches["left"]
    with torch.no_grad():
        full = model(ids, mask)["last_hidden_state"]
        cache = KVCache.for_model(model.config, batch_size=2, max_length=6)
        first = model(ids[:, :4], mask[:, :4], cache=cache)["last_hidden_state"]
        second = model(ids[:, 4:], mask[:, 4:], cache=cache)["last_hidden_state"]  # chunk of two, with a past
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first, second], 1)[real], full[real], atol=1e-5, rtol=0)
    assert cache.length == 6


def test_kv_cache_refuses_more_positions_than_it_holds():
    model = random_model()
    with pytest.raises(ValueError, match="max_length 2000 exceeds the model context"):
        KVCache.for_model(model.config, batch_size=1, max_length=2000)
    cache = KVCache.for_model(model.config, batch_size=1, max_length=4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="5 positions exceed the cache size"):
        model(torch.tensor([[4, 5]]), cache=cache)
