"""Checkpoint loading: every way a checkpoint can be wrong gives an error that says what and where."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.gpt2 import CheckpointError, GPT2Model
from models.loading import CONV1D_SUFFIXES, read_state_dict
from tests.fixtures.models import random_model


@pytest.fixture
def checkpoint(tmp_path):
    """A tiny-shaped model saved in the hub layout: returns (directory, model)."""
    model = GPT2Model(random_model().config.__class__(vocab_size=97, n_positions=32, n_embd=16, n_layer=2, n_head=2)).eval()
    return model.save_pretrained(tmp_path / "ckpt"), model


def rewrite_weights(directory, edit):
    state = load_file(directory / "model.safetensors")
    edit(state)
    save_file(state, directory / "model.safetensors")


def test_round_trip_and_hub_layout(checkpoint):
    directory, model = checkpoint
    stored = load_file(directory / "model.safetensors")
    assert "h.0.attn.c_attn.weight" in stored and "lm_head.weight" not in stored
    assert stored["h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D layout: (in, out)
    reloaded = GPT2Model.from_pretrained(directory)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(reloaded(ids)["last_hidden_state"], model(ids)["last_hidden_state"])
    assert json.loads((directory / "config.json").read_text())["n_embd"] == 16


def test_weights_file_path_and_prefixed_keys_load(checkpoint):
    directory, model = checkpoint
    rewrite_weights(directory, lambda s: s.update({f"transformer.{k}": s.pop(k) for k in list(s)}))
    reloaded = GPT2Model.from_pretrained(directory / "model.safetensors")
    assert torch.equal(reloaded.wte.weight, model.wte.weight)


def test_wrong_shape_is_named_in_checkpoint_layout(checkpoint):
    directory, _ = checkpoint
    rewrite_weights(directory, lambda s: s.update({"h.1.mlp.c_fc.weight": torch.zeros(16, 32)}))
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight has shape \(16, 32\), the model expects \(16, 64\)"):
        GPT2Model.from_pretrained(directory)


def test_missing_and_unexpected_tensors_are_listed(checkpoint):
    directory, _ = checkpoint

    def edit(state):
        del state["h.0.ln_2.bias"], state["ln_f.weight"]
        state["h.0.attn.extra"] = torch.zeros(1)

    rewrite_weights(directory, edit)
    with pytest.raises(CheckpointError) as error:
        GPT2Model.from_pretrained(directory)
    message = str(error.value)
    assert "missing tensors: h.0.ln_2.bias, ln_f.weight" in message
    assert "unexpected tensors: h.0.attn.extra" in message
    assert str(directory / "model.safetensors") in message


def test_config_of_another_size_is_caught(checkpoint):
    directory, _ = checkpoint
    config = json.loads((directory / "config.json").read_text())
    config["n_embd"] = 32
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="has shape"):
        GPT2Model.from_pretrained(directory)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_truncated_files_give_a_clear_error(checkpoint, weights):
    directory, model = checkpoint
    if weights == "pytorch_model.bin":
        (directory / "model.safetensors").unlink()
        torch.save(load_file_from(model), directory / weights)
    data = (directory / weights).read_bytes()
    (directory / weights).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        GPT2Model.from_pretrained(directory)


def load_file_from(model):
    from models.loading import ours_to_hf

    return ours_to_hf(model.state_dict())


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_wrong_format_gives_a_clear_error(checkpoint, weights):
    directory, _ = checkpoint
    (directory / "model.safetensors").unlink()
    (directory / weights).write_text("<html>not a checkpoint</html>")
    with pytest.raises(CheckpointError, match=weights.replace(".", r"\.")):
        GPT2Model.from_pretrained(directory)


def test_bin_refuses_arbitrary_pickles(tmp_path):
    """weights_only=True: a pickle that would run code is rejected, not executed."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weights": torch.zeros(1), "payload": subprocess.Popen}, path)
    with pytest.raises(CheckpointError, match=r"refused: it asks for \S*Popen, which is not a tensor type"):
        read_state_dict(path)


@pytest.mark.parametrize("cut", [120, 200, -3])
def test_truncated_legacy_format_bin_names_the_file(tmp_path, cut):
    """torch's pre-zip format fails with IndexError or struct.error when cut short: still a CheckpointError."""
    path = tmp_path / "pytorch_model.bin"
    torch.save({"h.0.attn.c_attn.weight": torch.randn(8, 24)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match=rf"{path.name}: (cannot load this PyTorch file, truncated or corrupt|"
                                              r"refused: .* or a damaged one)"):
        read_state_dict(path)


def test_directory_problems(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="not a checkpoint directory, a weights file, or a known model name"):
        GPT2Model.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        GPT2Model.from_pretrained(empty)
    directory, _ = checkpoint
    (directory / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: cannot read the model config"):
        GPT2Model.from_pretrained(directory)
    (directory / "config.json").write_text(json.dumps({"n_embd": 16}))
    with pytest.raises(CheckpointError, match="missing key 'vocab_size'"):
        GPT2Model.from_pretrained(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights file"):
        GPT2Model.from_pretrained(directory)


def test_conv1d_names_cover_the_four_matrices():
    names = {name for name, _ in random_model().named_parameters() if name.endswith(CONV1D_SUFFIXES)}
    assert len(names) == 4 * 2 and "h.0.attn.c_attn.weight" in names and "h.1.mlp.c_proj.weight" in names
