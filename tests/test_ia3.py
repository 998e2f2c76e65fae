"""modules.ia3: (IA)^3's vectors rescale the keys and values (bias included), the FFN's inner activation, or
peft's fused c_attn output; they start at ones."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.peft import MethodConfig
from tests.fixtures.peft import fresh, perturb_trainable


def test_ia3_scales_keys_values_and_the_ffn_inner_activation():
    model = fresh(MethodConfig("ia3", layers=[1]))
    layer = model.h[1]
    assert set(layer.ia3) == {"key", "value", "ffn"}
    assert all(torch.equal(v.scale, torch.ones_like(v.scale)) for v in layer.ia3.values())
    perturb_trainable(model, scale=0.3)
    l_k, l_v, l_ff = (layer.ia3[t].scale for t in ("key", "value", "ffn"))
    assert l_k.shape == l_v.shape == (64,) and l_ff.shape == (256,)
    x = torch.randn(2, 5, 64)
    attn, mlp = layer.layer.attn, layer.layer.mlp
    q, k, v = F.linear(x, attn.c_attn.weight, attn.c_attn.bias).split(64, dim=-1)
    inner = F.gelu(F.linear(x, mlp.c_fc.weight, mlp.c_fc.bias), approximate="tanh")
    with torch.no_grad():
        torch.testing.assert_close(attn.c_attn(x), torch.cat([q, l_k * k, l_v * v], dim=-1), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(mlp.c_proj(inner), F.linear(l_ff * inner, mlp.c_proj.weight, mlp.c_proj.bias),
                                   atol=1e-6, rtol=1e-6)


def test_ia3_peft_default_scales_the_whole_fused_c_attn_output():
    model = fresh(MethodConfig("ia3", ia3_targets=("c_attn", "ffn"), layers=[0]))
    perturb_trainable(model, scale=0.3)
    scale, linear = model.h[0].ia3["c_attn"].scale, model.h[0].layer.attn.c_attn
    assert scale.shape == (192,)
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(linear(x), scale * F.linear(x, linear.weight, linear.bias), atol=1e-6, rtol=1e-6)


def test_ia3_target_errors():
    with pytest.raises(ValueError, match=r"\(IA\)\^3 targets c_attn already covers query, key and value"):
        MethodConfig("ia3", ia3_targets=("c_attn", "value"))
    with pytest.raises(ValueError, match=r"\(IA\)\^3 targets must be among query, key, value, c_attn, ffn"):
        MethodConfig("ia3", ia3_targets=("mlp",))
