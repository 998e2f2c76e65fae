"""The frozen-part cache (tasks/feature_cache.py): where the frozen part ends, the RAM-then-disk store, and that a
cached run gives what the same run computes without the cache, under the same dropout rule (exactly in fp32,
within bf16 rounding in bf16), resumed in the middle or not."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.gpt2 import left_align
from models.peft import MethodConfig, apply_method
from models.tokenizer import GPT2Tokenizer
from models.tokenizer import pad_sequences as pad
from tasks import get_task
from tasks import feature_cache
from tasks.checkpoint import checkpoint_path
from tasks.classification import LastTokenClassifier
from tasks.feature_cache import TensorStore, attach, parse_size
from tests.fixtures.models import random_model
from tests.fixtures.task_files import base_args, run_script
from tests.test_trainer import config_for, interrupt_at_step, trained_tensors, without_timings

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]

CASES = {  # name -> (method, the boundary on the 2-layer tiny model, the same method as command-line flags)
    "head-only": (MethodConfig("last-linear-layer"), 3, {"method": "last-linear-layer"}),
    "lora-top-layer": (MethodConfig("lora", rank=4, layers=[1]), 1, {"method": "lora", "rank": 4, "layers": "1"}),
    "loreft-top-layer-last-position": (MethodConfig("loreft", rank=4, layers=[1], positions="l1"), 1,
                                       {"method": "loreft", "rank": 4, "layers": "1", "positions": "l1"}),
    "bitfit-top-layer": (MethodConfig("bitfit", layers=[1]), 1, {"method": "bitfit", "layers": "1"}),
    "loreft-last-position": (MethodConfig("loreft", rank=4, positions="l1"), 0,
                             {"method": "loreft", "rank": 4, "positions": "l1"}),
    "noreft-last-2-untied": (MethodConfig("noreft", rank=4, positions="l2", tie_positions=False), 0,
                             {"method": "noreft", "rank": 4, "positions": "l2", "untie-positions": True}),
}


# ----------------------------------------------------------------------------------------------- the boundary
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_boundary_is_the_first_layer_holding_a_trainable_parameter(name):
    method, boundary, _ = CASES[name]
    gpt = random_model("tiny")
    apply_method(gpt, copy.deepcopy(method))
    assert gpt.frozen_boundary() == boundary


@pytest.mark.parametrize("method", [MethodConfig("lora"), MethodConfig("loreft"), MethodConfig("full"),
                                    MethodConfig("layernorm")], ids=lambda m: m.method)
def test_nothing_is_cached_when_layer_0_or_the_embeddings_train(method):
    gpt = random_model("tiny")
    apply_method(gpt, copy.deepcopy(method))
    model = LastTokenClassifier(gpt, 3)
    assert gpt.frozen_boundary() == 0
    assert attach(model, gpt, True, None, ".", print) is None and gpt.frozen_cache is None
    assert model.head_dropout.p == 0.0 and gpt.drop.p == 0.1  # no cache: today's dropout


def test_a_trainable_parameter_outside_the_layers_means_no_cache():
    """Such as a part a method puts in front of the layers: everything depends on it. (Virtual tokens mean no cache
    even when frozen: test_soft_prompts.py.)"""
    gpt = random_model("tiny")
    apply_method(gpt, MethodConfig("lora", layers=[1]))
    gpt.in_front = nn.Parameter(torch.zeros(4, gpt.config.n_embd))
    assert gpt.frozen_boundary() == 0
    gpt.in_front.requires_grad_(False)
    assert gpt.frozen_boundary() == 1


def test_the_dropout_rule_switches_off_only_below_the_boundary():
    gpt = random_model("tiny")
    apply_method(gpt, MethodConfig("lora", rank=4, layers=[1], dropout=0.2))
    model = LastTokenClassifier(gpt, 3)
    messages = []
    cache = attach(model, gpt, True, None, ".", messages.append)
    assert cache is not None and gpt.frozen_cache is cache
    assert "entering layer 1" in messages[0] and "dropout off below layer 1" in messages[0]
    assert gpt.drop.p == 0.0 and gpt.h[0].attn.dropout == 0.0 and gpt.h[0].mlp.dropout.p == 0.0
    assert gpt.h[1].layer.attn.dropout == 0.1 and gpt.h[1].layer.mlp.dropout.p == 0.1  # the adapted layer keeps its
    assert [d.p for d in gpt.h[1].lora.modules() if isinstance(d, nn.Dropout)] == [0.2, 0.2]
    assert model.head_dropout.p == 0.1
    feature_cache.detach(gpt, cache)
    assert gpt.frozen_cache is None


# ----------------------------------------------------------------------------------------------- the store
def test_the_store_keeps_entries_in_ram_up_to_the_budget_then_in_a_memory_mapped_file(tmp_path):
    store = TensorStore(memory_budget=3 * 64 * 4, directory=tmp_path)
    entries = {f"row{i}".encode(): torch.randn(i + 1, 64) for i in range(6)}
    entries[b"bf16"] = torch.randn(5, 64).to(torch.bfloat16)
    for key, tensor in entries.items():
        assert store.put(key, tensor)
    assert store.ram_bytes == 3 * 64 * 4 and store.disk_bytes > 0 and len(store) == len(entries)
    assert set(store.ram) == {b"row0", b"row1"} and b"bf16" in store.spilled
    assert list(tmp_path.iterdir()) == []  # the spill file has no name: nothing is left behind
    for key, tensor in entries.items():
        assert torch.equal(store.get(key), tensor)
    store.close()


def test_the_store_stops_storing_when_the_disk_would_fill(tmp_path, monkeypatch):
    store = TensorStore(memory_budget=0, directory=tmp_path)
    monkeypatch.setattr(feature_cache, "DISK_RESERVE", 2**62)
    assert not store.put(b"x", torch.ones(3)) and store.full and b"x" not in store
    store.close()


@pytest.mark.parametrize("text, size", [("4G", 4 * 2**30), ("512M", 512 * 2**20), ("1.5k", 1536), ("0", 0),
                                        ("2GiB", 2 * 2**30), ("100", 100)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_a_bad_size_is_a_command_line_error_naming_the_flag(tmp_path, task_files):
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files, cache_memory="lots"))
    assert code == 2 and "--cache-memory: must be a size such as 4G, 512M or 0, got 'lots'" in err


# ----------------------------------------------------------------------------------------------- cached = uncached
def classifier_pair(method: MethodConfig, precision: str):
    """Two identical classifiers under the cache's dropout rule, the first with the cache attached."""
    models = []
    for cached in (True, False):
        torch.manual_seed(0)
        gpt = random_model("tiny")
        apply_method(gpt, copy.deepcopy(method))
        model = LastTokenClassifier(gpt, 3)
        gpt.set_precision(precision)
        cache = attach(model, gpt, True, 2**20 if cached else None, ".", lambda message: None)
        if not cached:
            feature_cache.detach(gpt, cache)
        models.append(model.train())
    return models


def batch(lengths, seed):
    generator = torch.Generator().manual_seed(seed)
    ids, mask = pad([torch.randint(0, 1000, (n,), generator=generator).tolist() for n in lengths])
    return ids, mask, torch.arange(len(lengths)) % 3


def loss_and_grads(model, ids, mask, labels, seed):
    torch.manual_seed(seed)  # the same dropout masks on both sides
    model.zero_grad(set_to_none=True)
    logits = model(ids, mask)
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_steps_give_the_losses_and_gradients_of_uncached_ones(name, precision):
    """Epoch 1 fills the cache, epoch 2 reads it; both equal the plain computation under the same dropout rule:
    exactly in fp32, and in bf16 up to the rounding of the stored hidden states to bf16 (the last-token features
    are stored in fp32: exact)."""
    cached, plain = classifier_pair(CASES[name][0], precision)
    exact = precision == "fp32" or name == "head-only"
    batches = [batch((9, 5, 1, 7), seed=1), batch((3, 3, 3), seed=2)]  # padded, and not
    for epoch in range(2):
        for k, (ids, mask, labels) in enumerate(batches):
            got, want = (loss_and_grads(m, ids, mask, labels, seed=10 * epoch + k) for m in (cached, plain))
            for a, b in [(got[0], want[0])] + [(got[1][grad], want[1][grad]) for grad in want[1]]:
                if exact:
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
                else:  # bf16 rounding of the stored hidden states: a relative error of a few bf16 ulps
                    assert (a - b).norm() <= 2e-2 * b.norm() + 1e-6
    cache = cached.gpt.frozen_cache
    assert len(cache.complete) == 7  # every row computed once (epoch 1) and read once (epoch 2)
    assert cache.reused_tokens == cache.computed_tokens > 0


@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_entries_serve_batches_of_another_composition(name):
    """An entry computed in one batch serves the same example in a batch of other rows, padded otherwise (as in
    evaluation): equal up to float rounding (a padded batch and an unpadded one run different attention kernels)."""
    cached, plain = classifier_pair(CASES[name][0], "fp32")
    ids, mask, _ = batch((9, 5, 1, 7), seed=1)
    with torch.no_grad():
        cached.eval()(ids, mask)  # fills the cache
        rows = [ids[i, mask[i].bool()].tolist() for i in (3, 1)] + [[5, 6]]  # two cached, one new
        ids2, mask2 = left_align(*pad(rows))
        torch.testing.assert_close(cached(ids2, mask2), plain.eval()(ids2, mask2), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- whole runs
def rule_without_cache(monkeypatch):
    """The cache's dropout rule without the cache: every epoch recomputes the frozen part."""
    real = feature_cache.attach

    def attach_rule_only(*args, **kwargs):
        cache = real(*args, **kwargs)
        feature_cache.detach(args[1], cache)
        return None

    monkeypatch.setattr(feature_cache, "attach", attach_rule_only)


def run_outputs(run_root):
    log = json.loads((run_root / "run" / "log.json").read_text())
    predictions = sorted((run_root / "predictions").iterdir())
    return trained_tensors(run_root / "run"), without_timings(log["epochs"]), [p.read_text() for p in predictions]


def assert_same_runs(first, second, **tolerance):
    tensors, history, predictions = first
    assert tensors.keys() == second[0].keys()
    for key in tensors:
        torch.testing.assert_close(second[0][key], tensors[key], **tolerance)
    if tolerance.get("atol", 0) == 0:
        assert second[1] == history
        assert second[2] == predictions
    else:
        for a, b in zip(history, second[1]):
            assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


@pytest.mark.slow  # two 2-epoch runs per case
@pytest.mark.parametrize("name", sorted(CASES))
def test_a_cached_run_is_the_uncached_run_with_the_same_dropout_rule(tmp_path, task_files, monkeypatch, name):
    """Through the trainer, dropout on: losses, trained tensors, dev metrics and prediction files. One example a
    batch, so that every example's frozen part is computed in the same shapes either way: then fp32 is exact."""
    flags = {**CASES[name][2], "epochs": 2, "dropout": 0.1, "batch_size": 1, "eval_batch_size": 1,
             "max_train_examples": 12, "max_eval_examples": 6}
    code, out, err = run_script("sentiment", base_args(tmp_path / "cached", task_files, **flags))
    assert code == 0, err
    assert "  cache: " in out and "reusing them saved" in out
    with monkeypatch.context() as patch:
        rule_without_cache(patch)
        code, out, err = run_script("sentiment", base_args(tmp_path / "plain", task_files, **flags))
    assert code == 0 and "reusing them saved" not in out, err
    assert_same_runs(run_outputs(tmp_path / "plain"), run_outputs(tmp_path / "cached"), rtol=0, atol=0)


@pytest.mark.slow  # three runs per case
@pytest.mark.parametrize("name", ["head-only", "lora-top-layer", "loreft-last-position"])
def test_a_cached_run_resumed_in_the_middle_ends_where_it_would_have(tmp_path, task_files, monkeypatch, name):
    """Interrupted in epoch 2, when the cache is full, and resumed: the new process starts with an empty cache and
    fills it again. Batches of 4, dropout on."""
    flags = {**CASES[name][2], "epochs": 2, "dropout": 0.1, "save_every_steps": 2}
    assert run_script("sentiment", base_args(tmp_path / "straight", task_files, **flags))[0] == 0
    interrupted = base_args(tmp_path / "interrupted", task_files, **flags)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 10)  # 6 steps an epoch
        assert run_script("sentiment", interrupted)[0] == 130
    code, out, err = run_script("sentiment", interrupted + ["--resume"])
    assert code == 0 and "resumed from" in out and "  cache: " in out, err
    assert_same_runs(run_outputs(tmp_path / "straight"), run_outputs(tmp_path / "interrupted"), rtol=0, atol=0)


def test_no_cache_keeps_todays_dropout_and_says_nothing(tmp_path, task_files):
    code, out, err = run_script("sentiment", base_args(tmp_path, task_files, method="last-linear-layer", no_cache=True,
                                                       dropout=0.1, max_train_examples=4, max_eval_examples=2))
    assert code == 0, err
    assert "  cache: " not in out
    assert json.loads((tmp_path / "run" / "log.json").read_text())["config"]["cache"] is False


def test_resume_refuses_a_checkpoint_made_with_the_other_cache_setting(tmp_path, task_files):
    args = base_args(tmp_path, task_files, method="last-linear-layer", max_train_examples=4, max_eval_examples=2)
    assert run_script("sentiment", args)[0] == 0
    code, _, err = run_script("sentiment", args + ["--resume", "--no-cache"])
    assert code == 1 and "cache: checkpoint True, now False" in err
    assert checkpoint_path(tmp_path / "run").is_file()


@pytest.mark.slow  # two runs per case
@pytest.mark.parametrize("name", ["lora-top-layer", "loreft-last-position"])
def test_in_bf16_a_cached_run_stays_within_bf16_rounding_of_the_uncached_one(tmp_path, task_files, monkeypatch, name):
    flags = {**CASES[name][2], "epochs": 2, "dropout": 0.1, "batch_size": 1, "eval_batch_size": 1,
             "max_train_examples": 12, "max_eval_examples": 6, "precision": "bf16"}
    assert run_script("sentiment", base_args(tmp_path / "cached", task_files, **flags))[0] == 0
    with monkeypatch.context() as patch:
        rule_without_cache(patch)
        assert run_script("sentiment", base_args(tmp_path / "plain", task_files, **flags))[0] == 0
    cached, plain = run_outputs(tmp_path / "cached"), run_outputs(tmp_path / "plain")
    for key, tensor in plain[0].items():
        assert (cached[0][key] - tensor).norm() <= 2e-2 * tensor.norm() + 1e-6, key
    for a, b in zip(plain[1], cached[1]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=2e-2)


@pytest.mark.slow  # two runs
def test_a_run_whose_cache_is_all_on_disk_is_the_same_run(tmp_path, task_files):
    """--cache-memory 0: every entry goes to the memory-mapped file, read back bit for bit."""
    flags = {"method": "lora", "layers": "1", "epochs": 2, "dropout": 0.1}
    assert run_script("sentiment", base_args(tmp_path / "ram", task_files, **flags))[0] == 0
    code, out, err = run_script("sentiment", base_args(tmp_path / "disk", task_files, cache_memory="0", **flags))
    assert code == 0, err
    assert "0 B in RAM + " in out and "0 B on disk" not in out
    log = json.loads((tmp_path / "disk" / "run" / "log.json").read_text())
    assert log["cache"]["ram_bytes"] == 0 and log["cache"]["disk_bytes"] > 0
    assert list((tmp_path / "disk" / "run").glob("feature-cache-*")) == []
    assert_same_runs(run_outputs(tmp_path / "ram"), run_outputs(tmp_path / "disk"), rtol=0, atol=0)


@pytest.mark.slow  # two sonnet runs
def test_a_cached_sonnet_run_is_the_uncached_one(tmp_path, task_files, monkeypatch):
    """Language modelling reads every position: the hidden states entering the first adapted layer serve the whole
    sequence (keyed by the tokens and the prompt mask); generation, with its own key/value cache, computes as usual."""
    flags = {"method": "lora", "rank": 4, "layers": "1", "epochs": 2, "dropout": 0.1, "batch_size": 1,
             "max_train_examples": 4, "max_eval_examples": 2, "max_new_tokens": 8}
    code, out, err = run_script("sonnet", base_args(tmp_path / "cached", task_files, **flags))
    assert code == 0, err
    assert "entering layer 1" in out and "cache: 4 rows" in out
    with monkeypatch.context() as patch:
        rule_without_cache(patch)
        assert run_script("sonnet", base_args(tmp_path / "plain", task_files, **flags))[0] == 0
    assert_same_runs(run_outputs(tmp_path / "plain"), run_outputs(tmp_path / "cached"), rtol=0, atol=0)


def test_the_final_predictions_read_the_cache_but_add_nothing_to_it(tmp_path, task_files):
    """Dev and training rows are reused; the test rows, predicted once at the end, are computed and dropped."""
    code, out, err = run_script("sentiment", base_args(tmp_path, task_files, method="last-linear-layer", epochs=2,
                                                       max_train_examples=8, max_eval_examples=4))
    assert code == 0, err
    config = config_for(tmp_path / "again", task_files, max_train_examples=8, max_eval_examples=4)
    data = get_task("sst").load(config, GPT2Tokenizer.from_pretrained(task_files.tokenizer), 1024).splits
    kept = {tuple(e.input_ids) for split in ("train", "dev") for e in data[split]}
    assert {tuple(e.input_ids) for e in data["test"]} - kept  # test rows the cache has not seen otherwise
    assert json.loads((tmp_path / "run" / "log.json").read_text())["cache"]["rows"] == len(kept)
    assert len((tmp_path / "predictions" / "last-linear-layer-sst-test-out.csv").read_text().splitlines()) == 1 + 4
