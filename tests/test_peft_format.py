"""models.peft_format through load_adapter / save_adapter: a LoRA adapter written by peft itself (../shared's
peer fixtures) gives peft's logits here; adapters built with peft in the test (test-only) load here to peft's
outputs, and ours saved in peft's format load in peft to ours; what cannot convert is refused by name."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.gpt2 import GPT2Model
from models.peft import MethodConfig, applied_methods, apply_method, load_adapter, save_adapter
from tests.fixtures.hf_reference import random_hf_model, save_safetensors_with_prefix, small_hf_config, transformers
from tests.fixtures.peft import perturb_trainable
from tests.fixtures.shared import PEER_FIXTURES, requires_peer_fixtures

peft = pytest.importorskip("peft", reason="peft is a test-only dependency")
pytestmark = [pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False"),
              pytest.mark.filterwarnings("ignore:Could not find a config file")]  # peft: the base dir is not beside it


@requires_peer_fixtures
def test_a_lora_adapter_written_by_peft_gives_peft_logits():
    reference = json.loads((PEER_FIXTURES / "reference_outputs.json").read_text())
    model = GPT2Model.from_pretrained(PEER_FIXTURES / "base")
    load_adapter(model, PEER_FIXTURES / "peft-lora-c_attn")
    assert applied_methods(model) == [MethodConfig("lora", rank=4, alpha=8.0, targets=("c_attn",))]
    ids, mask = torch.tensor(reference["input_ids"]), torch.tensor(reference["attention_mask"])
    with torch.no_grad():
        logits = model.hidden_state_to_token(model(ids, mask)["last_hidden_state"])
        base = GPT2Model.from_pretrained(PEER_FIXTURES / "base")
        base_logits = base.hidden_state_to_token(base(ids, mask)["last_hidden_state"])
    expected = torch.tensor(reference["peft_lora_logits"])
    # 1e-5 of the logits' scale: the fixture's weights are 5x GPT-2's init, its logits reach 15, and fp32 rounding
    # in another machine's kernels moves them by up to 4e-5 (peft itself here, on the same files, is 4e-5 away).
    scale = expected.abs().max()
    assert scale > 10 and (logits - expected).abs().max() <= 1e-5 * scale
    assert (base_logits - expected).abs().max() > 0.1  # the adapter changes the outputs visibly


# ------------------------------------------------------------------------------------------ round trips
def peft_and_ours(tmp_path, lora_config, hf_class="GPT2LMHeadModel", seed=0):
    """A random transformers GPT-2 wrapped by peft with random non-zero LoRA weights, and ours on the same base."""
    reference = random_hf_model(small_hf_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), seed=seed)
    base_dir = save_safetensors_with_prefix(reference, tmp_path / "base")
    hf_model = reference if hf_class == "GPT2LMHeadModel" else reference.transformer
    peft_model = peft.get_peft_model(hf_model, lora_config)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return peft_model, base_dir


def batch(vocab_size: int):
    ids = torch.randint(0, vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids)


def our_outputs(model: GPT2Model, ids, mask, lm_head=True):
    with torch.no_grad():
        hidden = model(ids, mask)["last_hidden_state"]
        return model.hidden_state_to_token(hidden) if lm_head else hidden


def peft_outputs(peft_model, ids, mask, lm_head=True):
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=mask)
        return out.logits if lm_head else out.last_hidden_state


@pytest.mark.parametrize("options, expected", [
    (dict(r=4, lora_alpha=8, target_modules=["c_attn"]), MethodConfig("lora", rank=4, alpha=8.0, targets=("c_attn",))),
    (dict(r=2, lora_alpha=5, target_modules=["c_attn", "c_proj"], use_rslora=True),
     MethodConfig("lora", rank=2, alpha=5.0, targets=("c_attn", "attn_out", "mlp_out"), rslora=True)),
    (dict(r=3, lora_alpha=6, target_modules=["c_fc"], use_dora=True),
     MethodConfig("dora", rank=3, alpha=6.0, targets=("mlp_in",))),
    (dict(r=2, lora_alpha=4, target_modules=["c_attn"], layers_to_transform=[0, 2]),
     MethodConfig("lora", rank=2, alpha=4.0, targets=("c_attn",), layers=[0, 2])),
])
def test_an_adapter_built_with_peft_round_trips_both_ways(tmp_path, options, expected):
    peft_model, base_dir = peft_and_ours(tmp_path, peft.LoraConfig(fan_in_fan_out=True, lora_dropout=0.0, **options))
    peft_model.save_pretrained(tmp_path / "from-peft")
    ids, mask = batch(300)
    expected_logits = peft_outputs(peft_model, ids, mask)

    ours = load_adapter(GPT2Model.from_pretrained(base_dir), tmp_path / "from-peft")
    assert applied_methods(ours) == [expected]
    torch.testing.assert_close(our_outputs(ours, ids, mask), expected_logits, atol=1e-5, rtol=0)

    save_adapter(ours, tmp_path / "to-peft", format="peft")
    saved = load_file(tmp_path / "to-peft" / "adapter_model.safetensors")
    original = load_file(tmp_path / "from-peft" / "adapter_model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    reloaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval(),
                                              tmp_path / "to-peft").eval()
    torch.testing.assert_close(peft_outputs(reloaded, ids, mask), expected_logits, atol=1e-5, rtol=0)


def test_gpt2model_layout_keys_load(tmp_path):
    """peft on transformers' GPT2Model (no LM head) writes base_model.model.h.{i}... keys."""
    peft_model, base_dir = peft_and_ours(tmp_path, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"],
                                                                   fan_in_fan_out=True), hf_class="GPT2Model")
    peft_model.save_pretrained(tmp_path / "from-peft")
    assert next(iter(load_file(tmp_path / "from-peft" / "adapter_model.safetensors"))).startswith("base_model.model.h.0.")
    ids, mask = batch(300)
    ours = load_adapter(GPT2Model.from_pretrained(base_dir), tmp_path / "from-peft")
    torch.testing.assert_close(our_outputs(ours, ids, mask, lm_head=False),
                               peft_outputs(peft_model.eval(), ids, mask, lm_head=False), atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [
    MethodConfig("lora", rank=2, alpha=6.0, targets=("query", "value")),
    MethodConfig("lora", rank=2, alpha=6.0, targets=("query", "key", "value"), rslora=True),
    MethodConfig("lora", rank=2, alpha=3.0, targets=("value", "mlp_out"), layers=[1]),
    MethodConfig("lora", rank=2, alpha=3.0, targets=("query", "value", "mlp_out")),  # rank_pattern for c_attn
    MethodConfig("dora", rank=2, alpha=4.0, targets=("query", "value", "attn_out")),
    MethodConfig("dora", rank=2, alpha=4.0, targets=("c_attn", "mlp_in")),
])
def test_our_adapters_saved_in_peft_format_give_our_outputs_in_peft(tmp_path, config):
    reference = random_hf_model(small_hf_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    base_dir = save_safetensors_with_prefix(reference, tmp_path / "base")
    ours = apply_method(GPT2Model.from_pretrained(base_dir), config)
    perturb_trainable(ours, scale=0.3)
    ids, mask = batch(300)
    expected = our_outputs(ours, ids, mask)
    save_adapter(ours, tmp_path / "adapter", format="peft")
    written = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert written["peft_type"] == "LORA" and written["use_dora"] == (config.method == "dora")
    in_peft = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    torch.testing.assert_close(peft_outputs(in_peft, ids, mask), expected, atol=1e-5, rtol=0)
    # Back here it loads as c_attn (the fused form peft holds), to the same outputs, unless c_attn needed its own
    # rank beside the other targets (rank_pattern), which one LoRA method cannot hold.
    if written["rank_pattern"]:
        with pytest.raises(ValueError, match=rf"different ranks or alphas \(r=2 alpha={config.alpha:g}, r=4 alpha={2 * config.alpha:g}\)"):
            load_adapter(GPT2Model.from_pretrained(base_dir), tmp_path / "adapter")
        return
    back = load_adapter(GPT2Model.from_pretrained(base_dir), tmp_path / "adapter")
    torch.testing.assert_close(our_outputs(back, ids, mask), expected, atol=1e-5, rtol=0)


def test_an_ia3_adapter_built_with_peft_round_trips_both_ways(tmp_path):
    """peft's GPT-2 default (IA3Config() on GPT-2: c_attn's output, mlp.c_proj's input)."""
    peft_model, base_dir = peft_and_ours(tmp_path, peft.IA3Config(task_type="CAUSAL_LM"))
    peft_model.save_pretrained(tmp_path / "from-peft")
    ids, mask = batch(300)
    expected = peft_outputs(peft_model.eval(), ids, mask)
    ours = load_adapter(GPT2Model.from_pretrained(base_dir), tmp_path / "from-peft")
    assert applied_methods(ours) == [MethodConfig("ia3", ia3_targets=("c_attn", "ffn"))]
    torch.testing.assert_close(our_outputs(ours, ids, mask), expected, atol=1e-5, rtol=0)
    save_adapter(ours, tmp_path / "to-peft", format="peft")
    saved = load_file(tmp_path / "to-peft" / "adapter_model.safetensors")
    original = load_file(tmp_path / "from-peft" / "adapter_model.safetensors")
    assert saved.keys() == original.keys() and all(torch.equal(saved[k], original[k]) for k in saved)
    reloaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval(),
                                              tmp_path / "to-peft").eval()
    torch.testing.assert_close(peft_outputs(reloaded, ids, mask), expected, atol=1e-5, rtol=0)


def test_our_ia3_on_keys_and_values_saved_for_peft_gives_our_outputs(tmp_path):
    reference = random_hf_model(small_hf_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    base_dir = save_safetensors_with_prefix(reference, tmp_path / "base")
    ours = apply_method(GPT2Model.from_pretrained(base_dir), MethodConfig("ia3", layers=[1, 2]))
    perturb_trainable(ours, scale=0.3)
    ids, mask = batch(300)
    expected = our_outputs(ours, ids, mask)
    save_adapter(ours, tmp_path / "adapter", format="peft")
    in_peft = peft.PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    torch.testing.assert_close(peft_outputs(in_peft, ids, mask), expected, atol=1e-5, rtol=0)
    back = load_adapter(GPT2Model.from_pretrained(base_dir), tmp_path / "adapter")  # as c_attn: peft's form
    assert applied_methods(back) == [MethodConfig("ia3", ia3_targets=("c_attn", "ffn"), layers=[1, 2])]
    torch.testing.assert_close(our_outputs(back, ids, mask), expected, atol=1e-5, rtol=0)


def test_ia3_on_a_module_this_project_does_not_scale_is_refused(tmp_path):
    peft_model, base_dir = peft_and_ours(tmp_path, peft.IA3Config(target_modules=["c_fc"], feedforward_modules=[]))
    peft_model.save_pretrained(tmp_path / "from-peft")
    with pytest.raises(ValueError, match="scaling the output of transformer.h.0.mlp.c_fc has no counterpart here"):
        load_adapter(GPT2Model.from_pretrained(base_dir), tmp_path / "from-peft")


# ------------------------------------------------------------------------------------------ refusals
def write_peft_dir(directory, config: dict, tensors: dict):
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, directory / "adapter_model.safetensors")
    return directory


LORA_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"], "fan_in_fan_out": True,
               "bias": "none", "use_dora": False, "use_rslora": False}
C_ATTN_0 = "base_model.model.transformer.h.0.attn.c_attn."


@pytest.mark.parametrize("config, tensors, message", [
    ({**LORA_CONFIG, "peft_type": "PREFIX_TUNING"}, {}, "cannot convert: peft_type='PREFIX_TUNING'"),
    ({**LORA_CONFIG, "bias": "all"}, {}, 'cannot convert: bias="all"'),
    ({**LORA_CONFIG, "modules_to_save": ["score"]}, {}, "modules_to_save"),
    ({**LORA_CONFIG, "target_modules": ["lm_head"]}, {"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 64)},
     "lm_head.lora_A.weight is not a tensor of a GPT-2 block's c_attn"),
    (LORA_CONFIG, {C_ATTN_0 + "lora_A.weight": torch.zeros(2, 64)}, "layer 0 attn.c_attn lacks B"),
    (LORA_CONFIG, {C_ATTN_0 + "lora_A.weight": torch.zeros(2, 64), C_ATTN_0 + "lora_B.weight": torch.zeros(192, 2),
                   C_ATTN_0 + "lora_magnitude_vector": torch.ones(192)}, "has a DoRA magnitude, but the config says use_dora=false"),
    ({**LORA_CONFIG, "target_modules": ["c_fc"]},
     {C_ATTN_0 + "lora_A.weight": torch.zeros(2, 64), C_ATTN_0 + "lora_B.weight": torch.zeros(192, 2)},
     'which target_modules=\\["c_fc"\\] does not name'),
    (LORA_CONFIG, {C_ATTN_0 + "lora_A.weight": torch.zeros(4, 64), C_ATTN_0 + "lora_B.weight": torch.zeros(192, 4)},
     "does not fit this model; tensors of another shape"),
    (LORA_CONFIG, {"base_model.model.transformer.h.7.attn.c_attn.lora_A.weight": torch.zeros(2, 64),
                   "base_model.model.transformer.h.7.attn.c_attn.lora_B.weight": torch.zeros(192, 2)},
     r"adapts layers \[7\]; this model has layers 0..1"),
])
def test_what_cannot_convert_is_refused_and_the_model_left_alone(tmp_path, config, tensors, message):
    from tests.fixtures.models import random_model

    directory = write_peft_dir(tmp_path / "adapter", config, tensors)
    model = random_model("tiny")
    with pytest.raises(ValueError, match=message):
        load_adapter(model, directory)
    assert applied_methods(model) == [] and all(type(layer).__name__ == "GPT2Layer" for layer in model.h)


def test_saving_in_peft_format_refuses_what_peft_cannot_hold(tmp_path):
    from tests.fixtures.models import random_model
    from tests.test_peft import TinyClassifier

    with pytest.raises(ValueError, match="peft's format holds lora, dora and ia3 adapters here; this model has loreft"):
        save_adapter(apply_method(random_model("tiny"), MethodConfig("loreft")), tmp_path / "a", format="peft")
    with pytest.raises(ValueError, match=r"also trains head.weight, head.bias \(its task head\)"):
        save_adapter(TinyClassifier(apply_method(random_model("tiny"), MethodConfig("lora"))), tmp_path / "b", format="peft")
    with pytest.raises(ValueError, match="save_adapter: format must be one of native, pyreft, peft, got 'pyreft2'"):
        save_adapter(random_model("tiny"), tmp_path / "c", format="pyreft2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_peft_adapter_cannot_take_a_name(tmp_path):
    from tests.fixtures.models import random_model

    model = apply_method(random_model("tiny"), MethodConfig("lora", targets=("c_attn",)))
    save_adapter(model, tmp_path / "adapter", format="peft")
    with pytest.raises(ValueError, match="does not stack; name= is for ReFT-family adapters"):
        load_adapter(random_model("tiny"), tmp_path / "adapter", name="second")
