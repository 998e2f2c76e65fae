"""models.config: GPT2Config's presets and checks."""
from __future__ import annotations

import pytest

from models.config import GPT2Config, PRESETS


def test_presets_have_the_published_sizes():
    expected = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}
    for name, (d, layers, heads) in expected.items():
        config = GPT2Config.preset(name)
        assert (config.n_embd, config.n_layer, config.n_head, config.vocab_size, config.n_positions) == (d, layers, heads, 50257, 1024)
    assert "tiny" in PRESETS
    with pytest.raises(ValueError, match="unknown GPT-2 size 'huge'"):
        GPT2Config.preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=10, n_head=3)
