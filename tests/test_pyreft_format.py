"""models.pyreft_format: pyreft's saved interventions read onto this project's GPT-2 (the fixture pyreft wrote itself
gives pyreft's logits), written so that pyreft reads them (its key names, config shape and state dicts), round
trips exact both ways for every family member, and what cannot be read or written refused by name."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from models.gpt2 import GPT2Model
from models.peft import MethodConfig, applied_methods, apply_method, load_adapter, save_adapter
from models.pyreft_format import is_pyreft_directory
from modules.reft import legacy_orthonormal_rows
from tests.fixtures.peft import fresh, perturb_trainable, right_padded
from tests.fixtures.shared import PEER_FIXTURES, requires_peer_fixtures

PYREFT_DIR = PEER_FIXTURES / "pyreft-loreft"
KEY = "layer_{}_comp_block_output_unit_pos_nunit_1#{}"


def logits(model: GPT2Model, ids, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model.hidden_state_to_token(model(ids, mask)["last_hidden_state"])


def ffn_intervention(model: GPT2Model, layer: int, slot: int = 0):
    return model.h[layer].interventions["ffn"]["default"].interventions[slot]


# ----------------------------------------------------------------------------- pyreft's own files
@requires_peer_fixtures
def test_pyreft_loreft_loads_to_pyreft_logits():
    reference = json.loads((PEER_FIXTURES / "reference_outputs.json").read_text())
    ids, mask = torch.tensor(reference["input_ids"]), torch.tensor(reference["attention_mask"])
    expected = torch.tensor(reference["pyreft_loreft_logits"])
    base = GPT2Model.from_pretrained(PEER_FIXTURES / "base")
    model = load_adapter(GPT2Model.from_pretrained(PEER_FIXTURES / "base"), PYREFT_DIR)
    assert applied_methods(model) == [MethodConfig("loreft", rank=2, positions="l1")]  # layers 0 and 1: all of them
    ours = logits(model, ids, mask)
    # Within 1e-5 of the logits' scale (they reach 17 on this 5x-scaled model): fp32 rounding differs between
    # machines by more than 1e-5 absolute. Measured here: ours 3.2e-5 off; transformers itself 1.2e-5 off at the
    # positions without intervention, and 2.0e-5 at the last with pyreft's formula applied to its hidden states.
    torch.testing.assert_close(ours, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)
    assert torch.equal(ours[:, :8], logits(base, ids, mask)[:, :8])  # only the last position is edited
    assert (ours[:, 8] - logits(base, ids, mask)[:, 8]).abs().max() > 0.1
    # pyreft's R as version 1's QR would have used it: rows flipped, other logits.
    saved = torch.load(PYREFT_DIR / f"intkey_{KEY.format(0, 0)}.bin", weights_only=True)
    assert (legacy_orthonormal_rows(saved["rotate_layer"].t()) - saved["rotate_layer"].t()).abs().max() > 0.1


@requires_peer_fixtures
def test_pyreft_files_read_then_written_are_pyreft_s_files(tmp_path):
    model = load_adapter(GPT2Model.from_pretrained(PEER_FIXTURES / "base"), PYREFT_DIR)
    written = save_adapter(model, tmp_path / "out", format="pyreft")
    theirs = json.loads((PYREFT_DIR / "config.json").read_text())
    theirs.pop("transformers_version")
    assert json.loads((written / "config.json").read_text()) == theirs
    assert sorted(p.name for p in written.iterdir()) == sorted(p.name for p in PYREFT_DIR.iterdir())
    for layer in (0, 1):
        name = f"intkey_{KEY.format(layer, 0)}.bin"
        a, b = (torch.load(d / name, weights_only=True) for d in (PYREFT_DIR, written))
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@requires_peer_fixtures
def test_positions_are_the_caller_s_choice(tmp_path):
    reference = json.loads((PEER_FIXTURES / "reference_outputs.json").read_text())
    ids = torch.tensor(reference["input_ids"])
    first = load_adapter(GPT2Model.from_pretrained(PEER_FIXTURES / "base"), PYREFT_DIR, positions="f1", name="mine")
    assert applied_methods(first)[0].positions == "f1" and applied_methods(first)[0].name == "mine"
    edited, plain = logits(first, ids), logits(GPT2Model.from_pretrained(PEER_FIXTURES / "base"), ids)
    assert (edited[:, 0] - plain[:, 0]).abs().max() > 0.1  # the first token is edited now, and it reaches the rest
    with pytest.raises(ValueError, match="`positions` applies to pyreft directories only"):
        load_adapter(fresh(), save_adapter(fresh(MethodConfig("loreft")), tmp_path / "native"), positions="l1")


# ----------------------------------------------------------------------------- round trips
ROUND_TRIPS = {
    "loreft": MethodConfig("loreft", rank=3, positions="l1"),
    "loreft-untied": MethodConfig("loreft", rank=3, positions="f1+l1", tie_positions=False, layers=[0]),
    "noreft": MethodConfig("noreft", rank=3, positions="l1"),
    "direft": MethodConfig("direft", rank=3, positions="l1"),
    "nodireft": MethodConfig("nodireft", rank=3, positions="l1", layers=[1]),
    "consreft": MethodConfig("consreft", rank=3, positions="l1"),
    "lobireft": MethodConfig("lobireft", rank=3, positions="l1"),
}


@pytest.mark.parametrize("name", list(ROUND_TRIPS))
def test_written_then_read_gives_the_same_outputs_exactly(tmp_path, name):
    config = ROUND_TRIPS[name]
    model = fresh(config)
    perturb_trainable(model, scale=0.3)
    directory = save_adapter(model, tmp_path / name, format="pyreft")
    assert is_pyreft_directory(directory)
    saved = json.loads((directory / "config.json").read_text())
    kind = {"loreft-untied": "loreft"}.get(name, name).capitalize()
    assert set(saved["intervention_types"]) == {f"<class 'pyreft.interventions.{kind}Intervention'>"}
    loaded = load_adapter(fresh(), directory)
    assert applied_methods(loaded) == [config]
    ids, mask = right_padded([7, 3, 5])
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask)["last_hidden_state"], model(ids, mask)["last_hidden_state"])
    again = save_adapter(loaded, tmp_path / "again", format="pyreft")  # and read then written: the same files
    for key in saved["sorted_keys"]:
        a, b = (torch.load(d / f"intkey_{key}.bin", weights_only=True) for d in (directory, again))
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_adapter_form_is_written_as_nodireft(tmp_path):
    model = fresh(MethodConfig("reft", rank=2, components=("ffn",), activation="identity", positions="l1"))
    perturb_trainable(model, scale=0.3)
    loaded = load_adapter(fresh(), save_adapter(model, tmp_path / "reft", format="pyreft"))
    assert applied_methods(loaded)[0].method == "nodireft"
    ids, _ = right_padded([5])
    assert torch.equal(loaded(ids)["last_hidden_state"], model(ids)["last_hidden_state"])


# ----------------------------------------------------------------------------- files made as pyreft makes them
class RotateLayer(nn.Module):
    """pyreft's LowRankRotateLayer under torch's orthogonal parametrisation, as pyreft builds it."""

    def __init__(self, d: int, r: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d, r))
        nn.init.orthogonal_(self.weight)


def pyreft_directory(tmp_path: Path, kind: str, states: dict[int, dict], rank: int) -> Path:
    directory = tmp_path / kind
    directory.mkdir()
    keys = [KEY.format(layer, 0) for layer in states]
    for key, state in zip(keys, states.values()):
        torch.save(state, directory / f"intkey_{key}.bin")
    (directory / "config.json").write_text(json.dumps({
        "intervention_constant_sources": [True] * len(states), "intervention_dimensions": [64] * len(states),
        "intervention_types": [f"<class 'pyreft.interventions.{kind}Intervention'>"] * len(states), "mode": "parallel",
        "representations": [[layer, "block_output", "pos", 1, rank] + [None] * 9 for layer in states],
        "sorted_keys": keys, "transformers_version": "4.45.1"}))
    return directory


def test_a_trained_parametrised_rotation_reads_as_pyreft_computes_it(tmp_path):
    """DiReFT's (and ConsReFT's, LobiReFT's) state dict holds torch's parametrisation, not R: trained, its
    `original` is no longer the -I it starts from."""
    torch.manual_seed(3)
    rotate = torch.nn.utils.parametrizations.orthogonal(RotateLayer(64, 2))
    with torch.no_grad():  # training moves the reflectors below the diagonal (the diagonal gets no gradient)
        rotate.parametrizations.weight.original.add_(0.1 * torch.randn(64, 2).tril(-1))
    source = nn.Linear(64, 2).to(torch.bfloat16)  # pyreft's default dtype for learned_source
    state = {"embed_dim": torch.tensor(64), "interchange_dim": torch.tensor(64),
             **{f"rotate_layer.{k}": v for k, v in rotate.state_dict().items()},
             **{f"learned_source.{k}": v for k, v in source.state_dict().items()}}
    model = load_adapter(fresh(), pyreft_directory(tmp_path, "Direft", {1: state}, rank=2))
    r_t = rotate.weight.detach()  # d x r
    h = torch.randn(3, 64)
    expected = h + (h @ source.weight.float().t() + source.bias.float()) @ r_t.t()  # pyreft: base + act(W h + b) R
    with torch.no_grad():
        torch.testing.assert_close(ffn_intervention(model, 1)(h), expected, atol=1e-5, rtol=1e-5)
    assert (r_t - rotate.parametrizations.weight[0].base[:, :2]).abs().max() > 1e-2  # R is not just the base's columns


def test_noreft_s_projection_bias_is_folded_into_the_source_bias(tmp_path):
    torch.manual_seed(4)
    proj, source = nn.Linear(64, 2), nn.Linear(64, 2)  # NoreftIntervention(add_bias=True)
    state = {"embed_dim": torch.tensor(64), "interchange_dim": torch.tensor(64),
             **{f"proj_layer.{k}": v for k, v in proj.state_dict().items()},
             **{f"learned_source.{k}": v for k, v in source.state_dict().items()}}
    model = load_adapter(fresh(), pyreft_directory(tmp_path, "Noreft", {0: state}, rank=2))
    h = torch.randn(3, 64)
    with torch.no_grad():
        expected = h + (source(h) - proj(h)) @ proj.weight  # pyreft's NoReFT: base + (W1 h + b1 - W2 h - b2) W2
        torch.testing.assert_close(ffn_intervention(model, 0)(h), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- refusals
class RunsCode:
    def __reduce__(self):
        return os.getcwd, ()  # harmless, but a file that asks for a function must not be loaded at all


def loreft_state(rank: int = 2) -> dict:
    rotate = torch.empty(64, rank)
    nn.init.orthogonal_(rotate)
    return {"weight": torch.randn(rank, 64), "bias": torch.randn(rank), "rotate_layer": rotate}


def test_a_pickle_that_needs_more_than_tensors_is_refused_and_the_model_left_as_it_was(tmp_path):
    directory = pyreft_directory(tmp_path, "Loreft", {0: loreft_state(), 1: {**loreft_state(), "extra": RunsCode()}}, 2)
    model = fresh()
    with pytest.raises(ValueError, match=r"intkey_layer_1_comp_block_output_unit_pos_nunit_1#0.bin: refused: it asks "
                                         r"for posix.getcwd"):
        load_adapter(model, directory)
    assert applied_methods(model) == [] and all(type(block).__name__ == "GPT2Layer" for block in model.h)


@pytest.mark.parametrize("damage, message", [
    ("component", r"representations\[0\]: component 'mlp_output', unit 'pos' x 1; only GPT-2's 'block_output'"),
    ("layer", r"representations\[0\]: layer 5 does not exist: this model has layers 0..1"),
    ("type", r"intervention_types\[0\] is .*VanillaIntervention.*; readable are pyreft's LoreftIntervention"),
    ("missing", r"intkey_layer_0_comp_block_output_unit_pos_nunit_1#0.bin: missing"),
    ("keys", r"a LoreftIntervention state dict has keys bias, rotate_layer, weight; this one has bias, weight"),
    ("shape", r"tensors of another shape for rank 2, hidden size 64: rotate \(2, 32\)"),
])
def test_files_that_do_not_fit_are_refused_by_name(tmp_path, damage, message):
    state = loreft_state()
    if damage == "keys":
        del state["rotate_layer"]
    if damage == "shape":
        state["rotate_layer"] = state["rotate_layer"][:32]
    directory = pyreft_directory(tmp_path, "Loreft", {0: state}, 2)
    config = json.loads((directory / "config.json").read_text())
    if damage == "component":
        config["representations"][0][1] = "mlp_output"
    if damage == "layer":
        config["representations"][0][0] = 5
    if damage == "type":
        config["intervention_types"][0] = "<class 'pyvene.models.interventions.VanillaIntervention'>"
    (directory / "config.json").write_text(json.dumps(config))
    if damage == "missing":
        (directory / f"intkey_{KEY.format(0, 0)}.bin").rename(directory / "intkey_elsewhere.bin")
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh(), directory)


class WithHead(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.gpt, self.head = gpt, nn.Linear(64, 2)


@pytest.mark.parametrize("build, message", [
    (lambda: WithHead(fresh(MethodConfig("loreft"))), r"interventions only; this model also trains head.weight, head.bias"),
    (lambda: fresh(MethodConfig("lora")), r"one ReFT-family adapter \(.*\); this model has lora"),
    (lambda: apply_method(fresh(MethodConfig("loreft")), MethodConfig("direft", name="b")), r"this model has loreft, direft"),
    (lambda: fresh(MethodConfig("loreft", components=("attention", "ffn"))), r"intervenes at attention,ffn"),
    (lambda: fresh(MethodConfig("loreft", alpha=8.0)), r"no scale; this adapter's alpha/rank is 8/4"),
    (lambda: fresh(MethodConfig("direft", activation="tanh")), r"does not save an intervention's act_fn.*'tanh'"),
])
def test_what_pyreft_s_files_cannot_hold_is_refused(tmp_path, build, message):
    with pytest.raises(ValueError, match=r"save_adapter\(format='pyreft'\) to .*" + message):
        save_adapter(build(), tmp_path / "out", format="pyreft")
    assert not (tmp_path / "out").exists()


def test_format_and_directory_recognition(tmp_path):
    with pytest.raises(ValueError, match="format must be one of native, pyreft, peft, got 'peft-ish'"):
        save_adapter(fresh(MethodConfig("loreft")), tmp_path / "x", format="peft-ish")
    native = save_adapter(fresh(MethodConfig("loreft")), tmp_path / "native")
    assert not is_pyreft_directory(native)
    fresh().save_pretrained(tmp_path / "checkpoint")  # a config.json, but no interventions
    assert not is_pyreft_directory(tmp_path / "checkpoint")


def test_untied_interventions_need_one_position_slot_each(tmp_path):
    directory = save_adapter(fresh(ROUND_TRIPS["loreft-untied"]), tmp_path / "untied", format="pyreft")
    assert json.loads((directory / "config.json").read_text())["sorted_keys"] == [KEY.format(0, 0), KEY.format(0, 1)]
    with pytest.raises(ValueError, match=r"2 interventions per layer need positions with 2 slots .* got 'l1'"):
        load_adapter(fresh(), directory, positions="l1")
    assert applied_methods(load_adapter(fresh(), directory, positions="f2"))[0].positions == "f2"


def test_loaded_interventions_are_frozen_unless_asked_to_train(tmp_path):
    directory = save_adapter(fresh(MethodConfig("loreft", positions="l1")), tmp_path / "pyreft", format="pyreft")
    frozen = load_adapter(fresh(), directory)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = load_adapter(fresh(), directory, trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == \
        {n for n, _ in trainable.named_parameters() if ".interventions." in n}
