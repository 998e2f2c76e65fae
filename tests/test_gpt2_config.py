"""models.config: GPT2Config's presets and checks."""
from __future__ import annotations

import json
import re

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


@pytest.mark.parametrize("field, value, message", [
    ("n_embd", "768", "GPT2Config.n_embd must be a positive integer, got '768'"),
    ("n_layer", True, "GPT2Config.n_layer must be a positive integer, got True"),
    ("n_head", -4, "GPT2Config.n_head must be a positive integer, got -4"),
    ("layer_norm_epsilon", -1e-5, "GPT2Config.layer_norm_epsilon must be a positive number, got -1e-05"),
    ("layer_norm_epsilon", "1e-5", "GPT2Config.layer_norm_epsilon must be a positive number, got '1e-5'"),
    ("resid_pdrop", "0.1", r"GPT2Config.dropout must be a number in \[0, 1\), got '0.1'"),
])
def test_a_bad_value_in_config_json_is_refused_naming_the_file_and_the_field(tmp_path, field, value, message):
    from models.loading import CheckpointError, read_config

    path = tmp_path / "config.json"
    path.write_text(json.dumps({**GPT2Config.preset("tiny").to_hf_dict(), field: value}))
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {message}$"):
        read_config(path)


@pytest.mark.parametrize("field, value, blamed", [
    ("n_positions", 10**12, r"the position embedding \(n_positions 1000000000000 x n_embd 64\)"),
    ("n_embd", 2**22, r"the layers \(n_layer 2 x 12 x n_embd 4194304\^2\)"),
    ("vocab_size", 10**13, r"the token embedding \(vocab_size 10000000000000 x n_embd 64\)"),
])
def test_an_impossible_shape_is_refused_before_anything_is_allocated(tmp_path, monkeypatch, field, value, blamed):
    """A config.json whose weights could never fit stops with the file and the field to blame, not with an
    allocation failure (or minutes of swapping)."""
    import torch

    from models.gpt2 import GPT2Model

    allocations = []
    monkeypatch.setattr(torch.nn.Embedding, "__init__", lambda *args, **kwargs: allocations.append(args))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({**GPT2Config.preset("tiny").to_hf_dict(), field: value}))
    (model_dir / "model.safetensors").write_bytes(b"never read")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(model_dir / 'config.json'))}: this GPT-2 shape has .* "
                                         rf"GiB in fp32, more than this machine's .* GiB of memory; most of it is {blamed}$"):
        GPT2Model.from_pretrained(str(model_dir))
    config = GPT2Config.preset("tiny", **{field: value})
    with pytest.raises(ValueError, match="^GPT2Config: this GPT-2 shape has"):
        GPT2Model(config)
    assert not allocations
    with torch.device("meta"):  # a skeleton on the meta device allocates nothing, so it is allowed
        monkeypatch.undo()
        assert GPT2Model(GPT2Config.preset("tiny", n_positions=10**12)).wpe.weight.shape == (10**12, 64)
