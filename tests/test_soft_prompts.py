"""The soft-prompt family (prompt, ptuning, prefix; modules/virtual_tokens.py, soft_prompt.py, prefix.py) in
GPT2Model: counts, the position convention under padding, initialisation, folding, generation, the ReFT prompt
mask, the trainable-suffix shortcut, bf16 and the task scripts. The generic method tests (one step changes only
trainable tensors, adapter reload) cover them through tests/fixtures/peft.py's ADAPTING; peft's outputs are
compared in test_soft_prompt_reference.py."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from models.generation import SamplingConfig, generate
from models.method_table import gpt2_trainable_count
from models.methods import saved_form
from models.peft import (
    ADAPTER_CONFIG,
    MethodConfig,
    apply_method,
    fold_methods,
    load_adapter,
    parameter_summary,
    save_adapter,
    virtual_positions,
)
from models.tokenizer import GPT2Tokenizer
from modules.kv_cache import KVCache
from modules.prefix import KeyValuePrefix
from modules.reft import PositionedIntervention, ReFTGPT2Layer
from modules.soft_prompt import EncodedPrompt, SoftPrompt
from tests.fixtures.peft import ADAPTING, fresh, perturb_trainable, right_padded, to_left_padding
from tests.fixtures.task_files import base_args, run_script
from tests.fixtures.tiny_tokenizer import write_tiny_tokenizer

SOFT = [name for name, config in ADAPTING.items() if config.spec.family == "prompt"]


def trained(name, seed=0):
    model = fresh(ADAPTING[name], seed=seed)
    perturb_trainable(model, scale=0.2)
    return model


# ----------------------------------------------------------------------------- counts and freezing
@pytest.mark.parametrize("config, expected", [
    (MethodConfig("prompt"), 20 * 768),  # 15,360
    (MethodConfig("prompt", num_virtual_tokens=5), 5 * 768),
    (MethodConfig("ptuning"), 20 * 768 + (768 * 768 + 768) * 3),  # inputs + the MLP encoder d -> 768 -> 768 -> d
    (MethodConfig("ptuning", encoder="lstm", encoder_hidden=64),
     20 * 768 + 2 * 4 * (64 * 768 + 64 * 64 + 2 * 64) + 2 * 4 * (64 * 128 + 64 * 64 + 2 * 64)
     + (128 * 64 + 64) + (64 * 768 + 768)),
    (MethodConfig("prefix"), 2 * 12 * 20 * 768),  # 368,640
    (MethodConfig("prefix", prefix_projection=512), 20 * 768 + (768 * 512 + 512) + (512 * 2 * 12 * 768 + 2 * 12 * 768)),
    (MethodConfig("prefix", layers=[0, 11]), 2 * 2 * 20 * 768),
])
def test_trainable_counts_equal_the_formulas_at_gpt2_shape(config, expected):
    """Counted on a meta-device gpt2 (shapes only); the base is frozen and adds nothing."""
    from models.config import GPT2Config
    from models.gpt2 import GPT2Model

    with torch.device("meta"):
        gpt = GPT2Model(GPT2Config.preset("gpt2"))
    apply_method(gpt, config)
    summary = parameter_summary(gpt)
    assert summary["trainable"] == expected and summary["total"] == 124_439_808 + expected
    assert all(name.startswith("virtual_tokens.") for name, p in gpt.named_parameters() if p.requires_grad)


def test_the_readme_counts_and_the_saved_forms():
    assert gpt2_trainable_count("prompt") == 15_360 and gpt2_trainable_count("prefix") == 368_640
    assert gpt2_trainable_count("ptuning") == 1_787_136
    # P-tuning is saved (and reloads) as plain embeddings: prompt tuning's 15,360.
    assert saved_form(MethodConfig("ptuning")) == MethodConfig("prompt")
    assert saved_form(MethodConfig("prefix", prefix_projection=512)) == MethodConfig("prefix")


@pytest.mark.parametrize("name", ["ptuning", "ptuning-lstm", "prefix-projection"])
def test_a_reparametrisation_is_saved_folded_and_reloads_as_plain_virtual_tokens(tmp_path, name):
    model = trained(name)
    ids, mask = right_padded([7, 3])
    with torch.no_grad():
        expected = model(ids, mask)["last_hidden_state"]
    directory = save_adapter(model, tmp_path / name)
    saved = json.loads((directory / ADAPTER_CONFIG).read_text())
    n, dim, layers = model.virtual_length, model.config.n_embd, model.config.n_layer
    assert saved["parameters"] == (n * dim if name.startswith("ptuning") else 2 * layers * n * dim)
    assert saved["parameters"] < parameter_summary(model)["trainable"]
    reloaded = load_adapter(fresh(), directory)
    assert type(reloaded.virtual_tokens) in (SoftPrompt, KeyValuePrefix)
    assert not hasattr(reloaded.virtual_tokens, "encoder") and getattr(reloaded.virtual_tokens, "projection", None) is None
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask)["last_hidden_state"], expected)
    # Loading it into the model that trained it (the trainer reloading its best epoch) folds that model in place.
    load_adapter(model, directory)
    assert model.peft_methods == [saved_form(ADAPTING[name])]
    with torch.no_grad():
        assert torch.equal(model(ids, mask)["last_hidden_state"], expected)


def test_folding_in_place_keeps_the_outputs():
    model = trained("ptuning-lstm")
    assert isinstance(model.virtual_tokens, EncodedPrompt)
    ids, mask = right_padded([6, 2])
    with torch.no_grad():
        expected = model(ids, mask)["last_hidden_state"]
        fold_methods(model)
        assert isinstance(model.virtual_tokens, SoftPrompt) and torch.equal(model(ids, mask)["last_hidden_state"], expected)


# ----------------------------------------------------------------------------- outputs and positions
@pytest.mark.parametrize("name", SOFT)
def test_soft_prompts_do_not_start_as_the_identity(name):
    """Virtual tokens change every output from step 0 (unlike LoRA or ReFT): attention always sees them."""
    ids, mask = right_padded([9, 5])
    with torch.no_grad():
        base, adapted = fresh()(ids, mask)["last_hidden_state"], fresh(ADAPTING[name])(ids, mask)["last_hidden_state"]
    assert adapted.shape == base.shape  # outputs cover the real tokens only
    assert (adapted - base)[0].abs().amax(-1).min() > 1e-3


@pytest.mark.parametrize("name", ["prompt", "prefix"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_real_tokens_take_positions_after_the_virtual_ones_whatever_the_padding(name, side):
    model = trained(name)
    n = model.virtual_length
    seen = []
    model.wpe.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    ids, mask = right_padded([7, 2, 5])
    if side == "left":
        ids, mask = to_left_padding(ids, mask)
    with torch.no_grad():
        model(ids, mask)
    positions = seen[0].expand(ids.shape[0], -1)
    for row in range(ids.shape[0]):
        real = int(mask[row].sum())
        if name == "prompt":  # the virtual columns come first, at positions 0..n-1
            assert positions[row, :n].tolist() == list(range(n))
        assert positions[row, -ids.shape[1]:][mask[row].bool()].tolist() == list(range(n, n + real))


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_virtual_tokens_initialised_from_tokens_act_as_that_hard_prompt(name):
    """Started from tokens t (as many as virtual tokens), prompt tuning's embeddings are t's, and the prefix is
    the frozen model's keys and values of t: either model gives what the base gives after the text t."""
    hard = [5, 17, 400, 33]
    model = fresh(MethodConfig(name, num_virtual_tokens=len(hard), prompt_init_ids=hard))
    ids, mask = right_padded([6, 3])
    with torch.no_grad():
        got = model(ids, mask)["last_hidden_state"]
        with_text = fresh()(torch.cat([torch.tensor([hard] * 2), ids], 1), torch.cat([torch.ones(2, 4, dtype=torch.long), mask], 1))
    for row in range(2):
        real = mask[row].bool()
        torch.testing.assert_close(got[row, real], with_text["last_hidden_state"][row, 4:][real], atol=1e-5, rtol=0)


def test_a_prefix_on_chosen_layers_leaves_the_others_as_they_were():
    """Layer 0 has no prefix: its output does not depend on the prefix (layer 1's does). The real tokens still
    take positions n, n+1, ..."""
    model = trained("prefix-layer-1")
    assert model.virtual_tokens.keyless_layers == {0}
    seen = []
    model.h[0].register_forward_hook(lambda m, args, out: seen.append(out))
    ids, mask = to_left_padding(*right_padded([6, 3]))
    with torch.no_grad():
        before = model(ids, mask)["last_hidden_state"]
        perturb_trainable(model, seed=5, scale=0.5)
        after = model(ids, mask)["last_hidden_state"]
    real = mask.bool()
    torch.testing.assert_close(seen[1][real], seen[0][real], atol=0, rtol=0)
    assert (after[real] - before[real]).abs().amax(-1).min() > 1e-4


def test_init_text_is_tokenized_with_the_runs_tokenizer_and_cycled_to_the_length(tmp_path):
    tokenizer = GPT2Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "tok"))
    config = MethodConfig("prompt", num_virtual_tokens=7, prompt_init_text=" the yes")
    ids = tokenizer.encode(" the yes")
    assert ids == [258, 263]
    model = fresh()
    apply_method(model, config, tokenizer=tokenizer)
    assert model.peft_methods[0].prompt_init_ids == (258, 263)  # recorded: a reload needs no tokenizer
    torch.testing.assert_close(model.virtual_tokens.embeddings, model.wte.weight[[258, 263] * 3 + [258]])
    with pytest.raises(ValueError, match="--prompt-init-text needs the run's tokenizer"):
        apply_method(fresh(), config)
    with pytest.raises(ValueError, match="prompt_init_text must be a non-empty text"):
        MethodConfig("prompt", prompt_init_text="")
    with pytest.raises(ValueError, match="beyond this model's vocabulary of 50257"):
        fresh(MethodConfig("prompt", prompt_init_ids=[50257]))
    with pytest.raises(ValueError, match="at most one soft prompt or prefix"):
        model.add_virtual_tokens(SoftPrompt(torch.zeros(2, 64)))


def test_the_context_counts_the_virtual_tokens():
    model = fresh(MethodConfig("prefix", num_virtual_tokens=10))
    assert model.virtual_length == 10 and model.input_capacity == model.config.n_positions - 10
    with pytest.raises(ValueError, match=r"sequence of \d+ tokens \(10 of them the method's virtual tokens\) exceeds"):
        model(torch.zeros(1, model.input_capacity + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\+ the method's virtual tokens \(10\) exceeds the model context"):
        generate(model, [[1] * (model.input_capacity - 3)], SamplingConfig(max_new_tokens=4))


@pytest.mark.parametrize("name", list(ADAPTING))
def test_the_virtual_positions_of_a_config_are_what_applying_it_adds(name):
    """What the trainer leaves room for before it applies the method (it reads the data first)."""
    assert virtual_positions(ADAPTING[name]) == fresh(ADAPTING[name]).virtual_length


@pytest.mark.filterwarnings("ignore:GPT2Model. random weights")
def test_max_length_leaves_room_for_the_virtual_tokens(tmp_path, task_files):
    args = base_args(tmp_path, task_files, method="prefix", max_length=1010, max_train_examples=2)
    code, _, err = run_script("sentiment", args)
    assert code == 1 and "--max-length 1010 exceeds the context" in err and "1004 tokens after the method's 20 virtual" in err


# ----------------------------------------------------------------------------- generation
def test_left_padded_generation_gives_each_prompt_its_own_tokens():
    """Cache equal to no cache, and padded batches equal to single rows, are checked for every method in
    test_peft.py; this checks generation's left padding with virtual tokens in front of it."""
    model = trained("prefix")
    prompts, sampling = [[5, 17, 400, 33, 9], [101, 7]], SamplingConfig(max_new_tokens=6)
    batch = generate(model, prompts, sampling)
    assert batch == [generate(model, [p], sampling)[0] for p in prompts] and batch != generate(fresh(), prompts, sampling)


def test_the_prefix_lives_in_the_kv_cache():
    model = trained("prefix")
    n = model.virtual_length
    cache = KVCache.for_model(model.config, 2, n + 8)
    ids, mask = to_left_padding(*right_padded([5, 3]))
    with torch.no_grad():
        model(ids, mask, cache=cache)
    assert cache.length == n + 5 and cache.padding_mask[:, :n].all()
    prefix = model.virtual_tokens.key_values()
    for row in range(2):
        torch.testing.assert_close(cache.keys[:, row, :, :n], prefix[:, 0])
        torch.testing.assert_close(cache.values[:, row, :, :n], prefix[:, 1])


# ----------------------------------------------------------------------------- ReFT positions, the suffix shortcut
def with_loreft(model: nn.Module, positions: str, layers=(1,)) -> nn.Module:
    """A LoReFT adapter added by hand beside the virtual tokens (the combination rule is not this file's)."""
    for index in layers:
        model.h[index] = ReFTGPT2Layer(model.h[index])
        model.h[index].add("ffn", "default", PositionedIntervention(model.config.n_embd, 4, positions, True,
                                                                    orthogonal=True, subtract_projection=True))
    perturb_trainable(model.h[layers[0]], seed=3, scale=0.5)
    return model


@pytest.mark.parametrize("side", ["right", "left"])
def test_virtual_tokens_are_never_prompt_positions_for_interventions(side):
    """With prompt tuning, LoReFT at f1+l1 edits the first and last real tokens, not virtual ones."""
    plain = trained("prompt")
    model = with_loreft(trained("prompt"), "f1+l1")
    seen = []
    model.h[1].interventions["ffn"]["default"].register_forward_hook(lambda m, args, out: seen.append(args[1].prompt_mask))
    ids, mask = right_padded([6, 3])
    if side == "left":
        ids, mask = to_left_padding(ids, mask)
    with torch.no_grad():
        edited, unedited = model(ids, mask)["last_hidden_state"], plain(ids, mask)["last_hidden_state"]
    n = model.virtual_length
    assert not seen[0][:, :n].any() and torch.equal(seen[0][:, n:], mask.bool())
    for row in range(2):
        real = mask[row].nonzero().flatten()
        changed = (edited[row] - unedited[row]).abs().amax(-1) > 1e-6  # the last layer: no later token sees the edit
        assert changed.nonzero().flatten().tolist() == [int(real[0]), int(real[-1])]


@pytest.mark.parametrize("soft", ["prompt", "ptuning-lstm", "prefix-projection"])
def test_a_soft_prompt_combined_with_loreft_keeps_its_positions_and_reloads_exactly(tmp_path, soft):
    """`prompt+loreft` and kin: the interventions' prompt positions are the real tokens; a P-tuning encoder or a
    prefix projection is folded in the combination's adapter, which reloads to the same outputs."""
    parts = [ADAPTING[soft], MethodConfig("loreft", rank=4, positions="f1+l1", layers=[1])]
    model = fresh(parts)
    perturb_trainable(model, scale=0.3)
    seen = []
    model.h[1].interventions["ffn"]["default"].register_forward_hook(lambda m, args, out: seen.append(args[1].prompt_mask))
    ids, mask = to_left_padding(*right_padded([6, 3]))
    with torch.no_grad():
        expected = model(ids, mask)["last_hidden_state"]
    columns = model.virtual_length if soft == "prompt" or soft.startswith("ptuning") else 0
    assert not seen[0][:, :columns].any() and torch.equal(seen[0][:, columns:], mask.bool())
    directory = save_adapter(model, tmp_path / "combo")
    saved = json.loads((directory / ADAPTER_CONFIG).read_text())
    assert [m["method"] for m in saved["methods"]] == [saved_form(ADAPTING[soft]).method, "loreft"]
    reloaded = load_adapter(fresh(), directory)
    with torch.no_grad():
        assert torch.equal(reloaded(ids, mask)["last_hidden_state"], expected)


def test_trained_virtual_tokens_turn_the_trainable_suffix_shortcut_off():
    model = with_loreft(trained("prefix"), "l1")
    assert model.trainable_suffix_length() is None  # the prefix trains and acts on every token
    model.virtual_tokens.requires_grad_(False)
    assert model.trainable_suffix_length() == 1


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_the_trainable_suffix_shortcut_stays_exact_beside_frozen_virtual_tokens(name):
    model = with_loreft(trained(name), "l1", layers=(0, 1))
    model.virtual_tokens.requires_grad_(False)
    ids, mask = right_padded([7, 3, 5])
    params = [p for p in model.parameters() if p.requires_grad]
    full = model(ids, mask)["last_token"]
    assert model.trainable_suffix_length() == 1
    shortcut = model.last_token(ids, mask)
    torch.testing.assert_close(shortcut, full, atol=1e-5, rtol=0)
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(0))
    full_grads = torch.autograd.grad((full * weights).sum(), params)
    shortcut_grads = torch.autograd.grad((shortcut * weights).sum(), params)
    for a, b in zip(full_grads, shortcut_grads):  # fp32 sums in another order: relative error per tensor
        assert (a - b).norm() / a.norm() < 1e-5


@pytest.mark.parametrize("name", ["prompt", "prefix"])
def test_no_frozen_cache_with_virtual_tokens_even_frozen_ones(name, tmp_path):
    """The frozen-part cache stores entries laid out by the real tokens; virtual positions before them are not
    there, so a model with virtual tokens (trained or frozen) runs uncached."""
    from tasks.feature_cache import attach

    model = with_loreft(trained(name), "l1", layers=(0, 1))
    model.virtual_tokens.requires_grad_(False)
    assert model.trainable_suffix_length() == 1 and model.frozen_boundary() == 0
    assert attach(model, model, True, None, tmp_path, print) is None and model.frozen_cache is None


# ----------------------------------------------------------------------------- precision
@pytest.mark.slow  # bf16 is emulated (slow) on CPUs without bf16 instructions
@pytest.mark.parametrize("name", SOFT)
def test_bf16_keeps_the_virtual_tokens_in_fp32_and_stays_close(name):
    model = trained(name)
    ids, mask = right_padded([6, 3])
    with torch.no_grad():
        fp32 = model(ids, mask)["last_hidden_state"]
        model.set_precision("bf16")
        bf16 = model(ids, mask)["last_hidden_state"]
    assert all(p.dtype == torch.float32 for p in model.virtual_tokens.parameters())
    assert model.wte.weight.dtype == torch.bfloat16
    for row in range(2):
        real = mask[row].bool()
        assert (bf16[row, real] - fp32[row, real]).abs().max() < 0.1 * fp32[row, real].abs().max()
    loss = model(ids, mask)["last_token"].square().sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.virtual_tokens.parameters())


# ----------------------------------------------------------------------------- the task scripts
@pytest.mark.slow  # one short run per task and method
@pytest.mark.filterwarnings("ignore:GPT2Model. random weights")
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("script, task, method, options, saved_as", [
    ("sentiment", "sst", "prompt", {"prompt_init_text": " the film is"}, "prompt"),
    ("sentiment", "sst", "prefix", {"num_virtual_tokens": 6}, "prefix"),
    ("paraphrase", "quora", "ptuning", {"encoder": "lstm", "encoder_hidden": 16}, "prompt"),
    ("paraphrase", "quora", "prefix", {"prefix_projection": 16}, "prefix"),
    ("sonnet", "sonnet", "prompt", {"max_new_tokens": 4}, "prompt"),
    ("sonnet", "sonnet", "prefix", {"max_new_tokens": 4, "prefix_projection": 8}, "prefix"),
])
def test_every_task_trains_with_virtual_tokens(tmp_path, task_files, script, task, method, options, saved_as):
    args = base_args(tmp_path, task_files, method=method, max_train_examples=4, max_eval_examples=3, **options)
    code, out, err = run_script(script, args)
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "best" / ADAPTER_CONFIG).read_text())
    assert [m["method"] for m in saved["methods"]] == [saved_as]
    assert saved["methods"][0].get("prefix_projection") is None
    if "prompt_init_text" in options:  # recorded with its ids under the run's tokenizer: reloads without it
        assert saved["methods"][0]["prompt_init_ids"] and saved["methods"][0]["prompt_init_text"] == " the film is"
    predictions = sorted(path.name for path in (tmp_path / "predictions").iterdir())
    assert predictions and all(path.stat().st_size > 0 for path in (tmp_path / "predictions").iterdir())


@pytest.mark.slow  # three short runs
@pytest.mark.filterwarnings("ignore:GPT2Model. random weights")
@pytest.mark.usefixtures("one_thread")
def test_compare_runs_the_soft_prompt_methods_side_by_side(tmp_path, task_files):
    from compare import main

    shared = base_args(tmp_path, task_files, method=None, output_dir=None, predictions_dir=None, max_train_examples=4,
                       max_eval_examples=3)
    code = main(["--task", "sst", "--methods", "prompt,ptuning,prefix", "--output-dir", str(tmp_path / "cmp"), "--in-process",
                 *shared, "--num-virtual-tokens", "3", "--encoder", "lstm", "--encoder-hidden", "8"])
    assert code == 0
    runs = {run["method"]: run for run in json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"]}
    assert set(runs) == {"prompt", "ptuning", "prefix"} and all(run["error"] is None for run in runs.values())
    assert runs["ptuning"]["result"]["method"]["encoder"] == "lstm"
    dim, layers, head = 64, 2, 5 * 64 + 5
    assert runs["prompt"]["result"]["trainable_params"] == 3 * dim + head
    assert runs["prefix"]["result"]["trainable_params"] == 2 * layers * 3 * dim + head
