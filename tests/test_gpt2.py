"""GPT2Model's own behaviour: random weights, padding on either side, the last real token, input checks,
precision, devices and the dropout control."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from models.generation import SamplingConfig, generate
from models.gpt2 import GPT2Model, last_real_token, resolve_device, resolve_precision
from models.peft import MethodConfig, apply_method
from tests.fixtures.models import left_and_right_padded, random_model


def test_random_weights_warn_and_unknown_names_fail():
    with pytest.warns(UserWarning, match="random weights"):
        model = GPT2Model.from_pretrained("random:tiny")
    assert model.config.n_embd == 64 and not model.training
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        GPT2Model.from_pretrained("random:enormous")


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(side):
    model = random_model()
    rows, batches = left_and_right_padded(model.config.vocab_size, [7, 3, 1, 5])
    ids, mask = batches[side]
    with torch.no_grad():
        batched = model(ids, mask)
        for i, row in enumerate(rows):
            alone = model(row[None])
            real = mask[i].bool()
            torch.testing.assert_close(batched["last_hidden_state"][i, real], alone["last_hidden_state"][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched["last_token"][i], alone["last_token"][0], atol=1e-5, rtol=0)


def test_last_real_token_picks_the_last_real_position_on_either_side():
    hidden = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert last_real_token(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_real_token(hidden, left).flatten().tolist() == [3.0, 7.0]
    assert last_real_token(hidden, None).flatten().tolist() == [3.0, 7.0]


def test_input_checks():
    model = random_model()
    too_long = torch.zeros(1, model.config.n_positions + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model context of 1024"):
        model(too_long)
    with pytest.raises(ValueError, match="does not match input_ids"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate(model, [[1] * 1000], SamplingConfig(max_new_tokens=100))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []])


def test_bf16_precision_keeps_trainable_parameters_fp32_and_stays_close():
    model = random_model()
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        reference = model(ids)["last_hidden_state"]
    for layer in model.h:
        layer.requires_grad_(False)
    model.set_precision("bf16")
    assert model.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert model.h[0].ln_1.weight.dtype == torch.float32  # LayerNorms stay fp32
    assert model.wte.weight.dtype == torch.float32  # still trainable, so fp32
    with torch.no_grad():
        low = model(ids)["last_hidden_state"]
    assert low.dtype == torch.float32
    assert (low - reference).abs().max() < 0.1 * reference.abs().max()
    model.set_precision("fp32")
    assert model.h[0].attn.c_attn.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        model.set_precision("fp8")


def test_precision_auto_and_explicit():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    auto = resolve_precision("auto", cpu)
    assert auto in ("bf16", "fp32") and random_model().set_precision("auto").precision == auto
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision("half", cpu)


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'; use cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device 'meta' is not supported"):
        resolve_device("meta")


# ------------------------------------------------------------------------------------------ dropout
def test_set_dropout_reaches_every_dropout_of_the_base_model():
    gpt = random_model("tiny")
    gpt.set_dropout(0.0)
    rates = [m.p for m in gpt.modules() if isinstance(m, nn.Dropout)]
    rates += [m.dropout for m in gpt.modules() if isinstance(getattr(m, "dropout", None), float)]
    assert len(rates) == 1 + 3 * gpt.config.n_layer and set(rates) == {0.0}
    gpt.train()
    ids = torch.randint(0, 1000, (2, 9))
    torch.testing.assert_close(gpt(ids)["last_hidden_state"], gpt(ids)["last_hidden_state"])  # deterministic


def test_set_dropout_sets_the_base_model_and_leaves_method_parts_alone():
    gpt = random_model("tiny")
    apply_method(gpt, MethodConfig("lora", rank=2, dropout=0.2))
    assert gpt.set_dropout(0.0) is gpt and gpt.config.dropout == 0.0
    base = [gpt.drop.p] + [r for layer in gpt.h for r in
                           (layer.layer.attn.dropout, layer.layer.attn.resid_dropout.p, layer.layer.mlp.dropout.p)]
    assert len(base) == 1 + 3 * gpt.config.n_layer and set(base) == {0.0}
    assert {adapter.dropout.p for layer in gpt.h for adapter in layer.lora.values()} == {0.2}
    gpt.train()
    ids = torch.randint(0, 1000, (2, 9))
    torch.testing.assert_close(gpt(ids)["last_hidden_state"], gpt(ids)["last_hidden_state"], rtol=0, atol=0)
    gpt.set_dropout(0.5)
    assert not torch.equal(gpt(ids)["last_hidden_state"], gpt(ids)["last_hidden_state"])
    with pytest.raises(ValueError, match="dropout"):
        gpt.set_dropout(1.0)


def test_course_call_shape_checks_the_sizes(tmp_path):
    """The course passes d, l and num_heads beside the name: they must be the checkpoint's."""
    import warnings

    from models.config import GPT2Config

    GPT2Model(GPT2Config.preset("tiny")).save_pretrained(tmp_path / "tiny")
    model = GPT2Model.from_pretrained(model=str(tmp_path / "tiny"), d=64, l=2, num_heads=4)
    assert (model.config.n_embd, model.config.n_layer, model.config.n_head) == (64, 2, 4)
    with pytest.raises(ValueError, match=r"d=768 but it has n_embd 64; l=12 but it has n_layer 2; num_heads=12 but it "
                                         r"has n_head 4 \(leave d, l and num_heads out"):
        GPT2Model.from_pretrained(model=str(tmp_path / "tiny"), d=768, l=12, num_heads=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="num_heads=8 but it has n_head 12"):
            GPT2Model.from_pretrained(model="random:gpt2", num_heads=8)
    with pytest.raises(ValueError, match="disagree"):
        GPT2Model.from_pretrained("gpt2", model="gpt2-medium")
