"""modules.lora: the LoRA formula on its third of the fused qkv, and merging into the weight and back."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.peft import MethodConfig, set_lora_merged
from tests.fixtures.peft import ADAPTING, fresh, perturb_trainable, right_padded


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_computes_w_x_plus_scaled_b_a_x_on_its_third_of_qkv(rslora):
    model = fresh(MethodConfig("lora", rank=4, alpha=8.0, targets=("query", "value"), layers=[0], rslora=rslora))
    perturb_trainable(model, scale=0.3)
    layer = model.h[0]
    x = torch.randn(3, 5, 64)
    scale = 8.0 / (2.0 if rslora else 4.0)  # alpha / sqrt(r) or alpha / r
    expected = F.linear(x, layer.layer.attn.c_attn.weight, layer.layer.attn.c_attn.bias)
    for target, third in (("query", 0), ("value", 2)):
        a, b = layer.lora[target].A, layer.lora[target].B
        expected[..., third * 64:(third + 1) * 64] += scale * x @ a.t() @ b.t()
    with torch.no_grad():
        torch.testing.assert_close(layer.layer.attn.c_attn(x), expected, atol=1e-5, rtol=1e-5)


def test_lora_merge_equals_unmerged_and_unmerge_restores_weights():
    model = fresh(ADAPTING["lora"])
    perturb_trainable(model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    ids, mask = right_padded([8, 3])
    with torch.no_grad():
        unmerged = model(ids, mask)["last_hidden_state"]
        set_lora_merged(model, True)
        merged = model(ids, mask)["last_hidden_state"]
        assert not torch.equal(model.h[0].layer.attn.c_attn.weight, original["h.0.layer.attn.c_attn.weight"])
        set_lora_merged(model, False)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key
    set_lora_merged(model, True)
    model.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        model(ids, mask)
