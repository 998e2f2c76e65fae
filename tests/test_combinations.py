"""Combinations of methods in one model (models/peft.py apply_method and check_combination, the command line's
--method lora+loreft and --PART.FLAG, the trainer's per-part learning rates): counts that add up, the family
rule, identity at the start, padding, exact reloads, generation and merging, and a training run end to end."""
from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from models import registry
from models.config import GPT2Config
from models.generation import SamplingConfig, generate
from models.gpt2 import GPT2Model
from models.method_table import gpt2_trainable_count
from models.methods import (
    MethodConfig,
    combination_name,
    get_method,
    method_from_json,
    method_to_json,
    parse_methods,
    registered_methods,
)
from models.peft import (
    ADAPTER_CONFIG,
    apply_method,
    applied_methods,
    load_adapter,
    parameter_summary,
    save_adapter,
    set_lora_merged,
    trainable_by_method,
)
from modules.reft import PositionedIntervention
from tasks import get_task
from tasks.cli import parse_args
from tasks.config import TrainConfig
from tasks.distributed import Distributed
from tasks.saved_run import load_run
from tasks.trainer import Trainer
from tests.fixtures.models import random_model
from tests.fixtures.peft import ADAPTING, assert_padding_changes_nothing, fresh, perturb_trainable, right_padded
from tests.fixtures.task_files import base_args, run_script
from tests.test_peft import TinyClassifier

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]

COMBINED = {
    "lora+loreft": [ADAPTING["lora"], MethodConfig("loreft", rank=4, positions="f1+l1", name="loreft")],
    "bitfit+loreft+noreft": [ADAPTING["bitfit"], MethodConfig("loreft", rank=2, positions="l1", name="loreft"),
                             MethodConfig("noreft", rank=2, positions="f2", components=("attention",), name="noreft")],
    "reft+layernorm": [ADAPTING["reft"], ADAPTING["layernorm"]],  # written reft first: applied layernorm first
}


def meta_gpt2() -> GPT2Model:
    with torch.device("meta"):
        return GPT2Model(GPT2Config.preset("gpt2"))


# ----------------------------------------------------------------------------------------------- counts
def test_counts_add_up_at_gpt2_shape():
    assert gpt2_trainable_count("lora+loreft") == 294_912 + 73_776 == 368_688
    gpt = apply_method(meta_gpt2(), parse_methods("bitfit+loreft+noreft"))
    by_part = {part.method: sum(p.numel() for p in params) for part, params in trainable_by_method(gpt)}
    assert by_part == {"bitfit": 102_144, "loreft": 73_776, "noreft": 73_776}
    assert parameter_summary(gpt)["trainable"] == 102_144 + 2 * 73_776
    assert all(gpt2_trainable_count(name) == count for name, count in by_part.items())


def test_parts_are_applied_weights_first_and_all_train():
    model = fresh(COMBINED["reft+layernorm"])
    assert [m.method for m in applied_methods(model)] == ["layernorm", "reft"]
    # The ReFT wrapper froze the layer it wraps, LayerNorms included: apply_method gave them back to their part.
    assert model.h[0].layer.ln_1.weight.requires_grad and model.h[0].interventions["ffn"]["default"].interventions[0].source.weight.requires_grad
    assert not model.h[0].layer.attn.c_attn.weight.requires_grad and not model.wte.weight.requires_grad
    owned = [{id(p) for p in params} for _, params in trainable_by_method(model)]
    assert not owned[0] & owned[1]
    assert set().union(*owned) == {id(p) for p in model.parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("parts, message", [
    (["full", "lora"], "full[+]lora: full cannot be combined with other methods"),
    (["last-linear-layer", "loreft"], "last-linear-layer[+]loreft: last-linear-layer cannot be combined"),
    (["lora", "bitfit"], "lora[+]bitfit: at most one weight-space method per model, got lora and bitfit"),
    (["loreft", "noreft"], "loreft[+]noreft: two ReFT-family parts are both named 'default'; give each its own name"),
])
def test_disallowed_combinations_are_refused_naming_the_parts(parts, message):
    model = random_model("tiny")
    with pytest.raises(ValueError, match=message):
        apply_method(model, [MethodConfig(name) for name in parts])
    assert applied_methods(model) == [] and all(type(layer).__name__ == "GPT2Layer" for layer in model.h)


@pytest.fixture
def two_prompt_methods():
    """Two soft-prompt methods (family "prompt"), registered for one test: the rule allows one per model."""
    methods = dict(registry.METHODS)

    def add_prompt(gpt, config, layers):
        gpt.register_parameter("test_prompt", nn.Parameter(torch.zeros(4, gpt.config.n_embd)))

    for name in ("soft-a", "soft-b"):
        registry.register_method(registry.Method(name, "virtual tokens", add_prompt, family="prompt"))
    yield
    registry.METHODS.clear(), registry.METHODS.update(methods)


def test_at_most_one_soft_prompt_method(two_prompt_methods):
    with pytest.raises(ValueError, match=r"soft-a\+soft-b: at most one soft-prompt method per model"):
        apply_method(random_model("tiny"), [MethodConfig("soft-a"), MethodConfig("soft-b")])
    model = apply_method(random_model("tiny"), parse_methods("lora+soft-a+loreft"))
    assert [m.method for m in applied_methods(model)] == ["lora", "soft-a", "loreft"] and model.test_prompt.requires_grad


def test_a_layer_wrapper_without_sublayers_is_named_when_reft_would_wrap_it(monkeypatch):
    """ReFT intervenes between a layer's attention and FFN sublayers, so a weight-space method's layer wrapper
    must expose them (attention_block, ffn_block, as LoRA's does)."""
    class Opaque(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.layer, self.gain = layer, nn.Parameter(torch.ones(()))

        def forward(self, x, ctx):
            return self.layer(x, ctx) * self.gain

    def wrap(gpt, config, layers):
        for index in layers:
            gpt.h[index] = Opaque(gpt.h[index])

    monkeypatch.setitem(registry.METHODS, "opaque", registry.Method("opaque", "a gain", wrap, {"layers": None}))
    with pytest.raises(TypeError, match="loreft cannot wrap layer 0: Opaque has no attention_block / ffn_block"):
        apply_method(random_model("tiny"), [MethodConfig("opaque"), MethodConfig("loreft")])


def test_a_weight_space_method_cannot_come_after_an_adapter():
    model = fresh(MethodConfig("loreft"))
    with pytest.raises(ValueError, match=r"already has loreft applied; a weight-space method \(lora\) must come first"):
        apply_method(model, MethodConfig("lora"))
    model = fresh(MethodConfig("lora"))
    apply_method(model, MethodConfig("loreft"))  # the other way round is a combination built in two calls
    assert combination_name(applied_methods(model)) == "lora+loreft"
    with pytest.raises(ValueError, match=r"already has lora\+loreft applied, so bitfit cannot be added"):
        apply_method(model, MethodConfig("bitfit"))


@pytest.mark.parametrize("prompt", [m.name for m in registered_methods() if m.family == "prompt"])
def test_reft_positions_count_real_prompt_tokens_never_virtual_ones(prompt):
    """The hook for soft prompts: whatever virtual tokens a prompt-family method adds, the intervention's
    prompt_mask marks exactly each row's real tokens (no prompt method is registered yet: then this is skipped)."""
    model = fresh([MethodConfig(prompt), MethodConfig("loreft", positions="f1+l1", name="loreft")])
    seen = []
    for module in model.modules():
        if isinstance(module, PositionedIntervention):
            module.register_forward_hook(lambda m, args, out: seen.append(args[1].prompt_mask))
    ids, mask = right_padded([6, 3])
    with torch.no_grad():
        model(ids, mask)
    assert seen and all(torch.equal(m.sum(-1).cpu(), mask.sum(-1)) for m in seen)


# ----------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("name", list(COMBINED))
def test_a_combination_starts_as_the_identity_and_one_step_moves_every_part(name):
    base, model = fresh(), fresh(COMBINED[name])
    ids, mask = right_padded([9, 5, 7])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask)["last_hidden_state"], base(ids, mask)["last_hidden_state"],
                                   atol=1e-5, rtol=0)
    head = nn.Linear(model.config.n_embd, 3)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    parts = trainable_by_method(model)
    before = [[p.detach().clone() for p in params] for _, params in parts]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad] + list(head.parameters()), lr=1e-2)
    nn.functional.cross_entropy(head(model(ids, mask)["last_token"]), torch.tensor([0, 1, 2])).backward()
    optimizer.step()
    for (part, params), old in zip(parts, before):
        assert any(not torch.equal(p, o) for p, o in zip(params, old)), f"{part.method} did not train"
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("name", list(COMBINED))
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_gives_each_example_its_own_outputs(name, side):
    assert_padding_changes_nothing(fresh(COMBINED[name]), side)


@pytest.mark.parametrize("name", list(COMBINED))
def test_one_adapter_directory_reloads_a_combination_exactly(tmp_path, name):
    model = TinyClassifier(fresh(COMBINED[name]))
    perturb_trainable(model)
    directory = save_adapter(model, tmp_path / name)
    saved = json.loads((directory / ADAPTER_CONFIG).read_text())
    assert saved["methods"] == method_to_json(applied_methods(model.gpt))
    assert saved["parameters"] == parameter_summary(model)["trainable"]
    ids, mask = right_padded([7, 2, 5])
    for trainable in (False, True):
        reloaded = load_adapter(TinyClassifier(fresh()), directory, trainable=trainable)  # the file's tensors win
        with torch.no_grad():
            assert torch.equal(reloaded(ids, mask), model(ids, mask))
        # Every part (and the head) is frozen, or with trainable=True trains as it did.
        assert [n for n, p in reloaded.named_parameters() if p.requires_grad] == \
            ([n for n, p in model.named_parameters() if p.requires_grad] if trainable else [])


def test_adapters_trained_separately_load_as_a_combination_and_save_as_one(tmp_path):
    lora, loreft = fresh(ADAPTING["lora"]), fresh(MethodConfig("loreft", positions="l1"))
    perturb_trainable(lora, seed=1, scale=0.2)
    perturb_trainable(loreft, seed=2, scale=0.2)
    save_adapter(lora, tmp_path / "lora")
    save_adapter(loreft, tmp_path / "loreft")
    both = load_adapter(load_adapter(fresh(), tmp_path / "lora"), tmp_path / "loreft")
    assert combination_name(applied_methods(both)) == "lora+loreft"
    ids, mask = right_padded([6, 3])
    with torch.no_grad():
        out, alone = both(ids, mask)["last_hidden_state"], lora(ids, mask)["last_hidden_state"]
        assert (out - alone).abs().max() > 1e-3  # the ReFT adapter acts on top of LoRA
        save_adapter(both, tmp_path / "both")
        assert torch.equal(load_adapter(fresh(), tmp_path / "both")(ids, mask)["last_hidden_state"], out)
    with pytest.raises(ValueError, match="a weight-space method \\(lora\\) must come first"):
        load_adapter(load_adapter(fresh(), tmp_path / "loreft"), tmp_path / "lora")


def test_a_combination_in_bf16_keeps_its_parts_in_fp32():
    fp32 = fresh(COMBINED["lora+loreft"])
    perturb_trainable(fp32, scale=0.2)
    bf16 = copy.deepcopy(fp32).set_precision("bf16")
    assert all(p.dtype == torch.float32 for _, params in trainable_by_method(bf16) for p in params)
    assert bf16.h[0].layer.layer.attn.c_attn.weight.dtype == torch.bfloat16
    ids, mask = right_padded([7, 4])
    out = bf16(ids, mask)["last_token"]
    out.sum().backward()
    assert all(p.grad is not None for _, params in trainable_by_method(bf16) for p in params)
    with torch.no_grad():
        torch.testing.assert_close(out, fp32(ids, mask)["last_token"], atol=0.1, rtol=0.05)


@pytest.mark.slow  # 24 generated tokens with and without the cache
def test_generation_cache_equals_no_cache_and_merging_folds_only_the_weight_part():
    model = fresh(COMBINED["lora+loreft"])
    perturb_trainable(model, scale=0.5)
    prompts = [[5, 17, 400, 33, 9], [101, 7], [7, 7, 7, 2000]]
    sampling = SamplingConfig(max_new_tokens=8)
    cached = generate(model, prompts, sampling, use_cache=True)
    assert cached == generate(model, prompts, sampling, use_cache=False)
    ids, mask = right_padded([8, 3])
    silent = copy.deepcopy(model)  # the same model with its ReFT part switched off
    for module in silent.modules():
        if isinstance(module, PositionedIntervention):
            module.register_forward_hook(lambda m, args, out: args[0])
    with torch.no_grad():
        unmerged = model(ids, mask)["last_hidden_state"]
        set_lora_merged(model, True)
        set_lora_merged(silent, True)
        merged, merged_without_reft = model(ids, mask)["last_hidden_state"], silent(ids, mask)["last_hidden_state"]
        assert all(m.merged for m in model.modules() if hasattr(m, "merged"))
        set_lora_merged(model, False)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    assert (merged - merged_without_reft).abs().max() > 1e-3  # the ReFT part still acts on the merged model


def test_auto_layers_are_chosen_once_for_the_parts_that_ask(monkeypatch):
    """--layers auto:K given once reaches every part; the parts asking for the same K share one choice, and
    parts asking for different Ks get theirs from one scoring pass."""
    import tasks.layer_choice as layer_choice

    calls = []

    def choose(task, gpt, splits, ks, seed, device, batch_size):
        calls.append(list(ks))
        return [layer_choice.LayerChoice("test", [0.0, 2.0, 1.0], [1, 2][:k], {}) for k in ks]

    monkeypatch.setattr(layer_choice, "choose_layer_sets", choose)
    parts = [MethodConfig("lora", layers="auto:1"), MethodConfig("loreft", layers="auto:1", name="loreft"),
             MethodConfig("noreft", layers=[0], name="noreft")]
    resolved, choices = layer_choice.resolve_auto_layers(None, None, {}, parts, 0, "cpu", 8)
    assert [part.layers for part in resolved] == [[1], [1], [0]] and calls == [[1]] and [c.chosen for c in choices] == [[1]]
    assert resolved[1] == MethodConfig("loreft", layers=[1], name="loreft")
    parts[2] = MethodConfig("noreft", layers="auto:2", name="noreft")
    calls.clear()
    resolved, choices = layer_choice.resolve_auto_layers(None, None, {}, parts, 0, "cpu", 8)
    assert [part.layers for part in resolved] == [[1], [1], [1, 2]] and calls == [[1, 2]]
    assert [c.chosen for c in choices] == [[1], [1, 2]]
    fixed = MethodConfig("lora", layers=[0])
    assert layer_choice.resolve_auto_layers(None, None, {}, fixed, 0, "cpu", 8) == (fixed, [])


# ----------------------------------------------------------------------------------------------- command line
def test_command_line_gives_each_part_its_options():
    config = parse_args("sst", ["--method", "lora+loreft", "--rank", "4", "--loreft.rank", "1", "--loreft.positions=l1",
                                "--loreft.untie-positions", "--lora-targets", "query,key"])
    assert config.method == [MethodConfig("lora", rank=4, targets=("query", "key")),
                             MethodConfig("loreft", rank=1, positions="l1", tie_positions=False, name="loreft")]
    assert config.method_name == "lora+loreft" and str(config.run_dir) == "runs/sst-lora+loreft"
    config = parse_args("sst", ["--method", "loreft:early+loreft:late", "--layers", "0", "--late.layers", "1"])
    assert config.method == [MethodConfig("loreft", layers=[0], name="early"), MethodConfig("loreft", layers=[1], name="late")]
    assert config.method_name == "loreft:early+loreft:late"
    # In paths a part's ':' is '-' (Windows allows no ':' in a file name).
    assert str(config.run_dir) == "runs/sst-loreft-early+loreft-late"
    assert get_task("sst").prediction_path(config, "dev").name == "loreft-early+loreft-late-sst-dev-out.csv"


def test_a_run_directory_written_with_the_name_s_colon_is_still_found(tmp_path, monkeypatch):
    """Runs of earlier versions kept the ':' in the directory name: --resume must find them."""
    monkeypatch.chdir(tmp_path)
    config = parse_args("sst", ["--method", "loreft:early+loreft:late"])
    assert str(config.run_dir) == "runs/sst-loreft-early+loreft-late"
    (tmp_path / "runs" / "sst-loreft:early+loreft:late").mkdir(parents=True)
    assert str(config.run_dir) == "runs/sst-loreft:early+loreft:late"
    (tmp_path / "runs" / "sst-loreft-early+loreft-late").mkdir()  # both: the new spelling wins
    assert str(config.run_dir) == "runs/sst-loreft-early+loreft-late"
    assert method_from_json(json.loads(json.dumps(config.to_dict()["method"]))) == config.method
    assert parse_args("sst", ["--method", "loreft:mine"]).method == MethodConfig("loreft", name="mine")


@pytest.mark.parametrize("argv, message", [
    (["--method", "full+lora"], "--method full+lora: full cannot be combined with other methods"),
    (["--method", "lora+dora"], "argument --method: invalid choice: unknown method 'dora'"),
    (["--method", "lora+bitfit"], "--method lora+bitfit: at most one weight-space method per model"),
    (["--method", "loreft+loreft"], "--method loreft+loreft: two parts are called 'loreft'"),
    (["--method", "lora:mine"], "'lora:mine': only a stacking (ReFT-family) method takes a name"),
    (["--method", "lora+loreft", "--noreft.rank", "1"], "--noreft.rank: --method lora+loreft has no part called 'noreft'"),
    (["--method", "lora+loreft", "--lora.positions", "l1"], "--lora.positions: --positions does not apply to method 'lora'"),
    (["--method", "lora+loreft", "--loreft.rank", "0"], "--loreft.rank must be >= 1, got 0"),
    (["--method", "lora+loreft", "--loreft.rank", "x"], "--loreft.rank must be an integer, got 'x'"),
    (["--method", "lora+loreft", "--loreft.rank"], "argument --loreft.rank: expected one argument"),
    (["--method", "lora+loreft", "--loreft.bogus", "1"], "--loreft.bogus: --bogus is not a method flag"),
    (["--method", "loreft+noreft", "--lora-targets", "query"], "--lora-targets does not apply to method 'loreft+noreft'"),
])
def test_command_line_errors_name_the_flag(capsys, argv, message):
    if "dora" in argv[1] and "dora" in [m.name for m in registered_methods()]:
        argv, message = ["--method", "lora+dora"], "--method lora+dora: at most one weight-space method per model"
    with pytest.raises(SystemExit) as exit:
        parse_args("sst", argv)
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_a_combination_writes_the_course_files_of_full_model_fine_tuning():
    config = TrainConfig("sst", method=parse_methods("lora+loreft"), course_names=True)
    assert config.method_family == "weights"
    assert get_task("sst").output_path(config, "dev").name == "full-model-sst-dev-out.csv"
    assert TrainConfig("sst", method=parse_methods("lora+loreft")).run_dir.name == "sst-lora+loreft"


def test_each_part_trains_at_its_own_learning_rate(tmp_path, task_files, monkeypatch):
    monkeypatch.setitem(registry.METHODS, "loreft", dataclasses.replace(get_method("loreft"), lr=5e-3))
    config = parse_args("sst", base_args(tmp_path, task_files, method="lora+loreft", max_train_examples=4))
    assert config.learning_rate == 5e-3  # the head's: the largest part's
    trainer = Trainer(get_task("sst"), config, Distributed(), torch.device("cpu"))
    trainer.setup()
    lr_of = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for part, params in trainable_by_method(trainer.gpt):
        assert params and {lr_of[id(p)] for p in params} == {1e-3 if part.method == "lora" else 5e-3}
    assert {lr_of[id(p)] for p in trainer.model.head.parameters()} == {5e-3}
    assert len(lr_of) == sum(p.requires_grad for p in trainer.model.parameters())
    again = parse_args("sst", base_args(tmp_path / "again", task_files, method="lora+loreft", lr=2e-4))
    assert {again.part_learning_rate(part) for part in again.method} == {again.learning_rate} == {2e-4}


@pytest.mark.slow  # one training run and a reload
def test_training_script_runs_a_combination_end_to_end(tmp_path, task_files):
    args = base_args(tmp_path, task_files, method="lora+loreft", rank=2, max_train_examples=8, max_eval_examples=6)
    code, out, err = run_script("sentiment", args + ["--loreft.positions", "l1", "--loreft.layers", "1"])
    assert code == 0, err
    parts = [MethodConfig("lora", rank=2), MethodConfig("loreft", rank=2, positions="l1", layers=[1], name="loreft")]
    lora, loreft, head = 2 * 2 * 2 * (2 * 64), 2 * 64 * 2 + 2, 5 * 64 + 5  # tiny: 2 layers, d 64, q and v
    assert f"sst / lora+loreft: trainable params: {lora + loreft + head:,}" in out
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["config"]["method_name"] == "lora+loreft" and method_from_json(log["config"]["method"]) == parts
    assert log["status"] == "finished" and (tmp_path / "predictions" / "lora+loreft-sst-dev-out.csv").is_file()
    saved = json.loads((tmp_path / "run" / "best" / ADAPTER_CONFIG).read_text())
    assert saved["methods"] == method_to_json(parts) and saved["parameters"] == lora + loreft + head
    model = load_run(tmp_path / "run")  # the run's base, method and head, from its directory
    assert applied_methods(model.gpt) == parts and not any(p.requires_grad for p in model.parameters())
