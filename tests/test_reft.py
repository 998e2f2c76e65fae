"""modules.reft: each intervention's formula, the orthonormalisation (an orthonormal R kept exactly as it is),
the family's starting points and gpt2 counts, first/last positions under left and right padding, edits confined
to their positions, and LoReFT's orthonormal projection under bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models.method_table import gpt2_trainable_count
from models.peft import MethodConfig
from modules.reft import LowRankIntervention, legacy_orthonormal_rows, orthonormal_rows, select_positions
from tests.fixtures.peft import fresh, perturb_trainable, right_padded

ACT = {"identity": lambda z: z, "tanh": torch.tanh, "relu": torch.relu, "gelu": lambda z: F.gelu(z, approximate="tanh")}


def gram_schmidt(raw: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning raw's rows, the k-th a positive combination of rows 1..k (classical Gram-Schmidt,
    in fp64): the orthonormalisation written out."""
    rows = []
    for row in raw.double():
        for done in rows:
            row = row - (row @ done) * done
        rows.append(row / row.norm())
    return torch.stack(rows).float()


@pytest.mark.parametrize("method, activation", [
    ("loreft", "identity"), ("noreft", "identity"), ("consreft", None), ("direft", "tanh"), ("nodireft", "tanh"),
    ("lobireft", None), ("reft", "relu"), ("reft", "gelu"),
])
def test_reft_interventions_compute_their_formula(method, activation):
    model = fresh(MethodConfig(method, rank=3, alpha=6.0, layers=[0], positions="all", activation=activation))
    perturb_trainable(model, scale=0.3)
    component = "ffn" if method != "reft" else "attention"
    intervention = model.h[0].interventions[component]["default"].interventions[0]
    weight = getattr(intervention.source, "weight", None)
    b, raw = intervention.source.bias, intervention.rotate
    h = torch.randn(4, 64)
    act = ACT[activation or "identity"]
    r = gram_schmidt(raw)  # the orthonormal R of the orthogonal variants
    s = 2.0  # alpha / rank
    expected = {
        "loreft": lambda: h + s * (act(h @ weight.t() + b) - h @ r.t()) @ r,  # h + R^T (W h + b - R h)
        "noreft": lambda: h + s * (act(h @ weight.t() + b) - h @ raw.t()) @ raw,  # W2 free
        "consreft": lambda: h + s * (b - h @ r.t()) @ r,  # h + R^T (b - R h)
        "direft": lambda: h + s * act(h @ weight.t() + b) @ r,  # h + R^T (W h + b)
        "nodireft": lambda: h + s * act(h @ weight.t() + b) @ raw,  # h + W2^T (W1 h + b)
        "lobireft": lambda: h + s * b @ r,  # h + R^T b
        "reft": lambda: h + s * act(h @ weight.t() + b) @ raw,  # the adapter form: h + up(act(down h))
    }[method]()
    with torch.no_grad():
        torch.testing.assert_close(intervention(h), expected, atol=1e-5, rtol=1e-5)
    assert (weight is None) == (method in ("consreft", "lobireft"))


def test_orthonormalisation_keeps_an_orthonormal_r_exactly_and_fixes_qr_signs():
    torch.manual_seed(0)
    orthonormal = torch.empty(4, 768)
    torch.nn.init.orthogonal_(orthonormal)
    # Plain QR (what adapter format version 1 used) flips rows of an orthonormal R: pyreft's R computed otherwise.
    assert (legacy_orthonormal_rows(orthonormal) + orthonormal).abs().amax(-1).min() < 1e-5
    assert torch.equal(orthonormal_rows(orthonormal), orthonormal)
    raw = torch.randn(4, 768)
    result = orthonormal_rows(raw)
    torch.testing.assert_close(result, gram_schmidt(raw), atol=1e-5, rtol=0)
    torch.testing.assert_close(result @ result.t(), torch.eye(4), atol=1e-5, rtol=0)
    assert torch.equal(orthonormal_rows(result), result)  # orthonormalising twice changes nothing


def test_orthonormalisation_has_the_gradient_of_the_sign_fixed_qr_also_where_it_returns_r_as_is():
    torch.manual_seed(0)
    raw = torch.empty(3, 64)
    torch.nn.init.orthogonal_(raw)
    upstream = torch.randn(3, 64)
    ours = raw.clone().requires_grad_(True)
    (orthonormal_rows(ours) * upstream).sum().backward()
    reference = raw.clone().requires_grad_(True)
    q, triangular = torch.linalg.qr(reference.t())
    ((q * triangular.diagonal().sign()).t() * upstream).sum().backward()
    torch.testing.assert_close(ours.grad, reference.grad, atol=1e-6, rtol=0)
    assert ours.grad.abs().max() > 1e-3


@pytest.mark.parametrize("method", ["loreft", "noreft", "direft", "nodireft", "lobireft", "reft"])
def test_the_family_starts_as_the_identity(method):
    intervention = fresh(MethodConfig(method, rank=4, layers=[0])).h[0].interventions["ffn"]["default"].interventions[0]
    h = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(intervention(h), h, atol=1e-5, rtol=0)


def test_consreft_starts_by_removing_the_component_in_r_subspace():
    """ConsReFT cannot start as the identity: h + R^T (b - R h) with b = 0 is h minus its projection onto R's rows."""
    intervention = fresh(MethodConfig("consreft", rank=4, layers=[0])).h[0].interventions["ffn"]["default"].interventions[0]
    r = intervention.projection().detach()
    h = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(intervention(h), h - h @ r.t() @ r, atol=1e-5, rtol=0)
    assert (intervention(h) - h).abs().max() > 1e-2


# 12 x (4 x 768 (W) + 4 (b) + 4 x 768 (R)) = 73,776 and, without W, 12 x (4 x 768 + 4) = 36,912 (rank 4, all layers).
@pytest.mark.parametrize("method, expected", [("loreft", 73_776), ("noreft", 73_776), ("direft", 73_776),
                                              ("nodireft", 73_776), ("consreft", 36_912), ("lobireft", 36_912)])
def test_family_counts_at_gpt2_shape_with_defaults(method, expected):
    assert gpt2_trainable_count(method) == expected  # on the meta device


def test_version_1_orthonormal_r_upgrades_to_what_it_computed():
    torch.manual_seed(0)
    intervention = LowRankIntervention(64, 3, orthogonal=True, subtract_projection=True)
    with torch.no_grad():
        intervention.rotate.add_(0.3 * torch.randn(3, 64))
    h = torch.randn(5, 64)
    rotate = torch.linalg.qr(intervention.rotate.detach().t())[0].t()  # version 1's projection: plain QR
    w, b = intervention.source.weight.detach(), intervention.source.bias.detach()
    old = h + (h @ w.t() + b - h @ rotate.t()) @ rotate
    intervention.upgrade_saved(1)
    with torch.no_grad():
        torch.testing.assert_close(intervention(h), old, atol=1e-6, rtol=0)
        assert torch.equal(intervention.projection(), rotate)


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


@pytest.mark.parametrize("method", ["noreft", "consreft", "direft", "nodireft", "lobireft"])
def test_the_family_under_bf16_trains_in_fp32_and_stays_near_fp32_outputs(method):
    config = MethodConfig(method, rank=4, positions="all")
    fp32 = fresh(config)
    perturb_trainable(fp32, scale=0.3)
    bf16 = fresh(config)
    bf16.load_state_dict(fp32.state_dict())
    bf16.set_precision("bf16")
    assert all(p.dtype == torch.float32 for p in bf16.parameters() if p.requires_grad)
    ids, _ = right_padded([6, 6])
    with torch.no_grad():
        low, high = bf16(ids)["last_hidden_state"].float(), fp32(ids)["last_hidden_state"]
    assert (low - high).abs().max() < 0.05 * high.abs().max()
