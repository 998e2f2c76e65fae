"""modules.attention: the plain-math attention path equals the fused SDPA kernel, padded or not."""
from __future__ import annotations

import pytest
import torch

from models.gpt2 import GPT2Model
from tests.fixtures.models import left_and_right_padded, random_model


def set_sdpa(model: GPT2Model, enabled: bool) -> None:
    for layer in model.h:
        layer.attn.use_sdpa = enabled


@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_plain_attention_equals_fused_kernel(side):
    model = random_model()
    rows, batches = left_and_right_padded(model.config.vocab_size, [9, 5, 2, 9])
    ids, mask = batches["left"] if side == "none" else batches[side]
    if side == "none":
        mask = None
    with torch.no_grad():
        fast = model(ids, mask)["last_hidden_state"]
        set_sdpa(model, False)
        plain = model(ids, mask)["last_hidden_state"]
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
