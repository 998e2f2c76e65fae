"""Adapters record the base they were trained on (name or path, weights fingerprint) and refuse another."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from models.base_identity import base_identity, weights_fingerprint
from models.gpt2 import GPT2Config, GPT2Model
from models.peft import ADAPTER_CONFIG, MethodConfig, apply_method, load_adapter, save_adapter
from tests.fixtures.models import random_model
from tests.fixtures.peft import perturb_trainable


def saved_model(tmp_path, seed: int = 0):
    torch.manual_seed(seed)
    GPT2Model(GPT2Config.preset("tiny")).save_pretrained(tmp_path / f"base{seed}")
    return tmp_path / f"base{seed}"


def test_fingerprint_follows_the_weights_not_their_storage(tmp_path):
    directory = saved_model(tmp_path)
    first, again = GPT2Model.from_pretrained(directory), GPT2Model.from_pretrained(str(directory))
    assert base_identity(first) == base_identity(again) == {"name_or_path": str(directory),
                                                            "fingerprint": weights_fingerprint(first)}
    other = GPT2Model.from_pretrained(saved_model(tmp_path, seed=1))
    assert base_identity(other)["fingerprint"] != base_identity(first)["fingerprint"]
    # Recorded at load time: bf16 storage and training do not change what the model was loaded as.
    apply_method(first, MethodConfig("full"))
    first.set_precision("bf16")
    with torch.no_grad():
        first.wte.weight.add_(1.0)
    assert base_identity(first) == base_identity(again)
    # One changed value at a sampled position changes the fingerprint.
    with torch.no_grad():
        again.ln_f.bias[0] += 1e-3
    assert weights_fingerprint(again) != base_identity(again)["fingerprint"]


def test_adapter_records_its_base_and_refuses_another(tmp_path):
    base, other_base = saved_model(tmp_path), saved_model(tmp_path, seed=1)
    model = apply_method(GPT2Model.from_pretrained(base), MethodConfig("lora", layers=[0]))
    perturb_trainable(model)
    directory = save_adapter(model, tmp_path / "adapter")
    recorded = json.loads((directory / ADAPTER_CONFIG).read_text())["base_model"]
    assert recorded == {"name_or_path": str(base), "fingerprint": base_identity(model)["fingerprint"]}

    load_adapter(GPT2Model.from_pretrained(base), directory)  # the same weights: fine
    untouched = GPT2Model.from_pretrained(other_base)
    state = {k: v.clone() for k, v in untouched.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_adapter(untouched, directory)
    message = str(error.value)
    assert f"adapter was trained on {base}" in message and f"this model is {other_base}" in message
    assert "allow_other_base=True" in message and "--allow-other-base" in message
    assert state.keys() == untouched.state_dict().keys()  # refused before the model changed
    with pytest.warns(UserWarning, match="loading it anyway"):
        forced = load_adapter(GPT2Model.from_pretrained(other_base), directory, allow_other_base=True)
    assert forced.peft_methods == [MethodConfig("lora", layers=[0])]


def test_adapters_without_a_recorded_base_still_load(tmp_path):
    model = apply_method(random_model("tiny"), MethodConfig("bitfit"))
    directory = save_adapter(model, tmp_path / "adapter")
    config = json.loads((directory / ADAPTER_CONFIG).read_text())
    del config["base_model"]  # as adapters written before bases were recorded
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config))
    torch.manual_seed(5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning either
        load_adapter(random_model("tiny"), directory)


def test_a_full_fine_tuning_adapter_fits_any_base_of_its_shape(tmp_path):
    """It holds every base weight, so the base it lands on does not matter: no check, the same outputs."""
    model = apply_method(GPT2Model.from_pretrained(saved_model(tmp_path)), MethodConfig("full"))
    directory = save_adapter(model, tmp_path / "full")
    other = load_adapter(GPT2Model.from_pretrained(saved_model(tmp_path, seed=1)), directory)
    ids = torch.randint(0, 1000, (1, 6))
    with torch.no_grad():
        assert torch.equal(other(ids)["last_hidden_state"], model(ids)["last_hidden_state"])
