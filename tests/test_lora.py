"""modules.lora: the LoRA formula on its third of the fused qkv and on the whole fused c_attn, DoRA's rescaled
update, and the targets' checks. Merging is in test_adapted_linear.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.peft import MethodConfig
from modules.lora import LoRAGPT2Layer
from tests.fixtures.peft import fresh, perturb_trainable


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


def test_fused_c_attn_target_shares_one_a_across_q_k_v():
    model = fresh(MethodConfig("lora", rank=4, alpha=8.0, targets=("c_attn",), layers=[1]))
    perturb_trainable(model, scale=0.3)
    layer = model.h[1]
    a, b = layer.lora["c_attn"].A, layer.lora["c_attn"].B
    assert a.shape == (4, 64) and b.shape == (3 * 64, 4)  # peft's lora_A / lora_B shapes for GPT-2's c_attn
    x = torch.randn(2, 6, 64)
    linear = layer.layer.attn.c_attn
    expected = x @ linear.weight.t() + linear.bias + 2.0 * x @ a.t() @ b.t()
    with torch.no_grad():
        torch.testing.assert_close(linear(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets, path, rows", [
    (("value",), "attn.c_attn", slice(128, 192)),
    (("c_attn",), "attn.c_attn", slice(0, 192)),
    (("mlp_in",), "mlp.c_fc", slice(0, 256)),
])
def test_dora_rescales_each_output_features_updated_row_to_its_magnitude(targets, path, rows):
    model = fresh(MethodConfig("dora", rank=4, alpha=8.0, targets=targets, layers=[0]))
    dora = model.h[0].lora[targets[0]]
    linear = model.h[0].layer.get_submodule(path)
    weight, bias = linear.weight, linear.bias
    torch.testing.assert_close(dora.magnitude, weight[rows].norm(dim=1))  # m starts at ||W||: the identity
    perturb_trainable(model, scale=0.3)
    x = torch.randn(2, 5, weight.shape[1])
    # W' = m (W + s B A) / ||W + s B A||, the norm over each output feature's row of the (out, in) weight.
    updated = weight[rows] + 2.0 * dora.B @ dora.A
    rescaled = dora.magnitude[:, None] * updated / torch.linalg.norm(updated, dim=1, keepdim=True)
    expected = F.linear(x, weight, bias)
    expected[..., rows] = x @ rescaled.t() + bias[rows]
    with torch.no_grad():
        torch.testing.assert_close(linear(x), expected, atol=1e-5, rtol=1e-5)


def test_dora_norm_is_a_constant_in_the_backward_pass():
    """As the DoRA paper (section 4.3) and peft do: gradients reach A and B through the update, not the norm."""
    model = fresh(MethodConfig("dora", rank=2, targets=("attn_out",), layers=[0]))
    perturb_trainable(model, scale=0.3)
    dora, linear = model.h[0].lora["attn_out"], model.h[0].layer.attn.c_proj
    x = torch.randn(3, 64)
    linear(x).square().sum().backward()
    norm = torch.linalg.norm(linear.weight + dora.scale * dora.B @ dora.A, dim=1).detach()
    grad_b = ((dora.magnitude / norm)[:, None] * (2 * linear(x)).t() @ (dora.scale * x @ dora.A.t())).detach()
    torch.testing.assert_close(dora.B.grad, grad_b, atol=1e-4, rtol=1e-4)


def test_target_errors_name_the_problem():
    with pytest.raises(ValueError, match="LoRA targets c_attn already covers query, key and value"):
        MethodConfig("lora", targets=("c_attn", "key"))
    with pytest.raises(ValueError, match="DoRA targets: c_attn already covers"):
        LoRAGPT2Layer(fresh().h[0], ["c_attn", "value"], rank=2, alpha=2.0, dora=True)
    with pytest.raises(ValueError, match="LoRA targets must be among query, key, value, c_attn"):
        MethodConfig("dora", targets=("qkv",))
