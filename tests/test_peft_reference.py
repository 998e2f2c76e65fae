"""LoRA on the fused c_attn, DoRA and (IA)^3 against peft (a test-only dependency) on transformers' GPT-2: both
built from the same random weights, peft's adapter parameters set to random non-identity values and copied to
ours, the logits must agree within 1e-5 in fp32."""
from __future__ import annotations

import re

import pytest
import torch

from models.gpt2 import GPT2Model
from models.peft import MethodConfig, apply_method
from tests.fixtures.hf_reference import random_hf_model, save_safetensors_with_prefix, small_hf_config

peft = pytest.importorskip("peft", reason="peft is a test-only dependency")
# peft's IA3 warns that GPT-2's Conv1D layers force fan_in_fan_out on, which is what it should do.
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")

# peft's module inside a GPT-2 block -> our target, for LoRA/DoRA and for (IA)^3
LORA_TARGET_OF = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}
IA3_TARGET_OF = {"attn.c_attn": "c_attn", "mlp.c_proj": "ffn"}
PEFT_PARAMETER = re.compile(r"base_model\.model\.transformer\.h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\."
                            r"(lora_A\.default\.weight|lora_B\.default\.weight|lora_magnitude_vector\.default\.weight|"
                            r"ia3_l\.default)$")
OUR_NAME = {"lora_A.default.weight": "A", "lora_B.default.weight": "B",
            "lora_magnitude_vector.default.weight": "magnitude", "ia3_l.default": "scale"}


def models_from_the_same_weights(tmp_path, seed=0):
    reference = random_hf_model(small_hf_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), seed=seed)
    ours = GPT2Model.from_pretrained(save_safetensors_with_prefix(reference, tmp_path / "base"))
    return reference, ours


def randomise_and_copy(peft_model, ours: GPT2Model, seed=1):
    """Sets every adapter parameter of the peft model to random values away from its initialisation and copies
    it into ours; returns how many tensors were copied."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(ours.named_parameters())
    copied = 0
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if not param.requires_grad:
                continue
            match = PEFT_PARAMETER.fullmatch(name)
            assert match, f"unexpected trainable peft parameter {name}"
            layer, module, kind = match.groups()
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
            family, target = ("ia3", IA3_TARGET_OF[module]) if kind == "ia3_l.default" else ("lora", LORA_TARGET_OF[module])
            params[f"h.{layer}.{family}.{target}.{OUR_NAME[kind]}"].copy_(param.flatten() if family == "ia3" else param)
            copied += 1
    assert copied == sum(p.requires_grad for p in ours.parameters())
    return copied


def assert_same_logits(peft_model, ours: GPT2Model, vocab_size: int):
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, vocab_size, (3, 11), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding: positions agree with transformers' 0..T-1 at every real token
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        got = ours.hidden_state_to_token(ours(ids, mask)["last_hidden_state"])
    for row, n in enumerate(mask.sum(1).tolist()):
        torch.testing.assert_close(got[row, :n], expected[row, :n], atol=1e-5, rtol=0)
    return expected


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_on_fused_c_attn_matches_peft(tmp_path, rslora):
    reference, ours = models_from_the_same_weights(tmp_path)
    base_logits = reference(torch.arange(11)[None]).logits
    peft_model = peft.get_peft_model(reference, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0, use_rslora=rslora))
    apply_method(ours, MethodConfig("lora", rank=4, alpha=8.0, targets=("c_attn",), rslora=rslora))
    assert randomise_and_copy(peft_model, ours) == 2 * 3  # A and B in each of 3 layers
    assert_same_logits(peft_model, ours, reference.config.vocab_size)
    with torch.no_grad():
        assert (peft_model(torch.arange(11)[None]).logits - base_logits).abs().max() > 1e-2  # the update matters


@pytest.mark.parametrize("targets, ours_targets", [
    (["c_attn"], ("c_attn",)),
    (["c_attn", "c_proj", "c_fc"], ("c_attn", "attn_out", "mlp_in", "mlp_out")),  # "c_proj" matches both
])
def test_dora_matches_peft(tmp_path, targets, ours_targets):
    reference, ours = models_from_the_same_weights(tmp_path)
    peft_model = peft.get_peft_model(reference, peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=True, lora_dropout=0.0, use_dora=True))
    apply_method(ours, MethodConfig("dora", rank=4, alpha=8.0, targets=ours_targets))
    # Before any change both start from m = ||W||: the same magnitudes, computed independently.
    params = dict(ours.named_parameters())
    for name, param in peft_model.named_parameters():
        if "lora_magnitude_vector" in name:
            match = PEFT_PARAMETER.fullmatch(name)
            ours_magnitude = params[f"h.{match[1]}.lora.{LORA_TARGET_OF[match[2]]}.magnitude"]
            torch.testing.assert_close(ours_magnitude, param, atol=1e-6, rtol=1e-6)
    assert randomise_and_copy(peft_model, ours) == 3 * 3 * len(ours_targets)  # A, B, m
    assert_same_logits(peft_model, ours, reference.config.vocab_size)


def test_ia3_peft_default_for_gpt2_matches_peft(tmp_path):
    """peft's GPT-2 default: the fused c_attn output and the input of mlp.c_proj (a feed-forward module)."""
    assert peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["gpt2"] == ["c_attn", "mlp.c_proj"]
    assert peft.utils.constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING["gpt2"] == ["mlp.c_proj"]
    reference, ours = models_from_the_same_weights(tmp_path)
    peft_model = peft.get_peft_model(reference, peft.IA3Config(task_type="CAUSAL_LM"))
    apply_method(ours, MethodConfig("ia3", ia3_targets=("c_attn", "ffn")))
    assert randomise_and_copy(peft_model, ours) == 2 * 3
    assert_same_logits(peft_model, ours, reference.config.vocab_size)


def test_ia3_on_keys_and_values_is_peft_c_attn_with_the_query_third_at_one(tmp_path):
    """The paper's targets (keys, values, FFN): peft cannot name k and v apart, but its c_attn vector with ones on
    the query third computes the same."""
    reference, ours = models_from_the_same_weights(tmp_path)
    peft_model = peft.get_peft_model(reference, peft.IA3Config(task_type="CAUSAL_LM"))
    apply_method(ours, MethodConfig("ia3"))
    generator = torch.Generator().manual_seed(2)
    d = reference.config.n_embd
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            match = PEFT_PARAMETER.fullmatch(name)
            if match is None:
                continue
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
            layer = match[1]
            if match[2] == "attn.c_attn":
                param[:d] = 1.0
                params[f"h.{layer}.ia3.key.scale"].copy_(param[d:2 * d, 0])
                params[f"h.{layer}.ia3.value.scale"].copy_(param[2 * d:, 0])
            else:
                params[f"h.{layer}.ia3.ffn.scale"].copy_(param.flatten())
    assert_same_logits(peft_model, ours, reference.config.vocab_size)
