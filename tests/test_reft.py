"""modules.reft: each intervention's formula, first/last positions under left and right padding, edits confined
to their positions, and LoReFT's orthonormal projection under bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.peft import MethodConfig
from modules.reft import select_positions
from tests.fixtures.peft import fresh, perturb_trainable, right_padded


@pytest.mark.parametrize("method, activation", [("loreft", "identity"), ("noreft", "identity"), ("direft", "tanh"),
                                                ("reft", "relu"), ("reft", "gelu")])
def test_reft_interventions_compute_their_formula(method, activation):
    model = fresh(MethodConfig(method, rank=3, alpha=6.0, layers=[0], positions="all", activation=activation))
    perturb_trainable(model, scale=0.3)
    component = "ffn" if method != "reft" else "attention"
    intervention = model.h[0].interventions[component]["default"].interventions[0]
    w, bias, rotate = intervention.source.weight, intervention.source.bias, intervention.rotate
    h = torch.randn(4, 64)
    act = {"identity": lambda z: z, "tanh": torch.tanh, "relu": torch.relu,
           "gelu": lambda z: F.gelu(z, approximate="tanh")}[activation]
    if method == "loreft":
        r = torch.linalg.qr(rotate.t())[0].t()  # orthonormal rows spanning the stored R's rows
        torch.testing.assert_close(r @ r.t(), torch.eye(3), atol=1e-5, rtol=0)
        expected = h + 2.0 * (act(h @ w.t() + bias) - h @ r.t()) @ r  # h + (alpha/r) R^T (W h + b - R h)
    elif method == "noreft":
        expected = h + 2.0 * (act(h @ w.t() + bias) - h @ rotate.t()) @ rotate
    else:  # direft and the adapter form: h + (alpha/r) R^T act(W h + b)
        expected = h + 2.0 * act(h @ w.t() + bias) @ rotate
    with torch.no_grad():
        torch.testing.assert_close(intervention(h), expected, atol=1e-5, rtol=1e-5)


def test_select_positions_on_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    left = right.flip(-1)
    slots = [("f", 0), ("f", 1), ("l", 0)]
    index, valid = select_positions(right, slots)
    assert index[valid].tolist() == [0, 1, 3, 0, 1, 0]
    assert valid.tolist() == [[True, True, True], [True, True, False], [True, False, False]]
    index, valid = select_positions(left, slots)
    assert index[0].tolist() == [2, 3, 5] and index[1, :2].tolist() == [4, 5] and index[2, 0] == 5
    assert valid.tolist() == [[True, True, True], [True, True, False], [True, False, False]]


def test_positioned_interventions_act_only_on_their_positions():
    base, model = fresh(), fresh(MethodConfig("loreft", positions="l1", layers=[1]))
    perturb_trainable(model, scale=0.5)
    ids, _ = right_padded([6])
    with torch.no_grad():
        edited, plain = model(ids)["last_hidden_state"], base(ids)["last_hidden_state"]
    # Layer 1 is the last layer: only the last token's state can differ.
    torch.testing.assert_close(edited[0, :5], plain[0, :5], atol=1e-6, rtol=0)
    assert (edited[0, 5] - plain[0, 5]).abs().max() > 1e-3


def test_loreft_projection_stays_orthonormal_in_fp32_under_bf16():
    model = fresh(MethodConfig("loreft", rank=4))
    model.set_precision("bf16")
    intervention = model.h[0].interventions["ffn"]["default"].interventions[0]
    assert intervention.rotate.dtype == torch.float32 and intervention.rotate.requires_grad
    perturb_trainable(model, scale=0.3)
    rotate = intervention.projection()
    torch.testing.assert_close(rotate @ rotate.t(), torch.eye(4), atol=1e-5, rtol=0)
    ids, _ = right_padded([5])
    assert torch.isfinite(model(ids)["last_hidden_state"]).all()
