"""Internal consistency of the model: attention paths, padding on either side, the KV cache, generation,
precision and input checks."""
from __future__ import annotations

import pytest
import torch

from models.config import GPT2Config, PRESETS
from models.generation import SamplingConfig, generate, next_token
from models.gpt2 import GPT2Model, last_real_token, resolve_device, resolve_precision
from modules.kv_cache import KVCache
from tests.conftest import random_model


def set_sdpa(model: GPT2Model, enabled: bool) -> None:
    for layer in model.h:
        layer.attn.use_sdpa = enabled


def left_and_right_padded(vocab: int, prompts: list[int], seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, vocab, (n,), generator=generator) for n in prompts]
    length = max(prompts)
    batches = {}
    for side in ("left", "right"):
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, row in enumerate(rows):
            span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
            ids[i, span], mask[i, span] = row, 1
        batches[side] = (ids, mask)
    return rows, batches


def test_presets_have_the_published_sizes():
    expected = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}
    for name, (d, layers, heads) in expected.items():
        config = GPT2Config.preset(name)
        assert (config.n_embd, config.n_layer, config.n_head, config.vocab_size, config.n_positions) == (d, layers, heads, 50257, 1024)
    assert "tiny" in PRESETS
    with pytest.raises(ValueError, match="unknown GPT-2 size 'huge'"):
        GPT2Config.preset("huge")
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(n_embd=10, n_head=3)


def test_random_weights_warn_and_unknown_names_fail():
    with pytest.warns(UserWarning, match="random weights"):
        model = GPT2Model.from_pretrained("random:tiny")
    assert model.config.n_embd == 64 and not model.training
    with pytest.raises(ValueError, match="unknown GPT-2 size"):
        GPT2Model.from_pretrained("random:enormous")


@pytest.mark.parametrize("side", ["left", "right", "none"])
def test_plain_attention_equals_fused_kernel(side):
    model = random_model()
    rows, batches = left_and_right_padded(model.config.vocab_size, [9, 5, 2, 9])
    ids, mask = batches["left"] if side == "none" else batches[side]
    if side == "none":
        mask = None
    with torch.no_grad():
        fast = model(ids, mask)["last_hidden_state"]
        set_sdpa(model, False)
        plain = model(ids, mask)["last_hidden_state"]
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(side):
    model = random_model()
    rows, batches = left_and_right_padded(model.config.vocab_size, [7, 3, 1, 5])
    ids, mask = batches[side]
    with torch.no_grad():
        batched = model(ids, mask)
        for i, row in enumerate(rows):
            alone = model(row[None])
            real = mask[i].bool()
            torch.testing.assert_close(batched["last_hidden_state"][i, real], alone["last_hidden_state"][0], atol=1e-5, rtol=0)
            torch.testing.assert_close(batched["last_token"][i], alone["last_token"][0], atol=1e-5, rtol=0)


def test_last_real_token_picks_the_last_real_position_on_either_side():
    hidden = torch.arange(2 * 4, dtype=torch.float).view(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert last_real_token(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_real_token(hidden, left).flatten().tolist() == [3.0, 7.0]
    assert last_real_token(hidden, None).flatten().tolist() == [3.0, 7.0]


def test_cached_forward_equals_full_forward():
    model = random_model()
    rows, batches = left_and_right_padded(model.config.vocab_size, [6, 3])
    ids, mask = batches["left"]
    with torch.no_grad():
        full = model(ids, mask)["last_hidden_state"]
        cache = KVCache.for_model(model.config, batch_size=2, max_length=6)
        first = model(ids[:, :4], mask[:, :4], cache=cache)["last_hidden_state"]
        second = model(ids[:, 4:], mask[:, 4:], cache=cache)["last_hidden_state"]  # chunk of two, with a past
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first, second], 1)[real], full[real], atol=1e-5, rtol=0)
    assert cache.length == 6


def test_greedy_with_cache_equals_greedy_without_token_for_token():
    model = random_model()
    prompts = [[5, 17, 400, 33, 9], [101], [7, 7, 7, 7, 7, 7, 7, 2000]]
    sampling = SamplingConfig(max_new_tokens=25)
    cached = generate(model, prompts, sampling, use_cache=True)
    uncached = generate(model, prompts, sampling, use_cache=False)
    assert cached == uncached
    assert all(len(tokens) == 25 for tokens in cached)
    # A batch of different lengths gives every prompt what it gets alone.
    assert cached == [generate(model, [p], sampling)[0] for p in prompts]


def test_sampling_with_cache_equals_sampling_without_for_the_same_seed():
    model = random_model()
    prompts = [[5, 17, 400], [101, 3]]
    sampling = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=0.7, top_k=40, top_p=0.9)
    outputs = [generate(model, prompts, sampling, use_cache=c, generator=torch.Generator().manual_seed(3)) for c in (True, False)]
    assert outputs[0] == outputs[1]


def test_stop_token_ends_a_row_and_is_not_returned():
    model = random_model()
    prompt = [[5, 17, 400]]
    free = generate(model, prompt, SamplingConfig(max_new_tokens=10))[0]
    stop = free[3]
    stopped = generate(model, prompt, SamplingConfig(max_new_tokens=10, stop_token_id=stop))[0]
    assert stopped == free[: free.index(stop)]


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    generator = torch.Generator().manual_seed(0)
    top2 = next_token(logits, SamplingConfig(do_sample=True, top_k=2), generator)
    assert set(top2.tolist()) == {0, 1}
    probs = torch.softmax(logits[0], -1)  # 0.64, 0.24, 0.09, ...: top_p 0.8 keeps exactly the first two
    assert probs[0] < 0.8 < probs[0] + probs[1]
    nucleus = next_token(logits, SamplingConfig(do_sample=True, top_p=0.8), generator)
    assert set(nucleus.tolist()) == {0, 1}
    assert next_token(logits[:1], SamplingConfig()).tolist() == [0]
    for bad in (dict(temperature=0.0), dict(top_k=0), dict(top_p=1.5), dict(max_new_tokens=-1)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampling_draws_from_the_softmax_at_the_temperature(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    draws = next_token(logits.repeat(20_000, 1), SamplingConfig(do_sample=True, temperature=temperature), generator)
    frequencies = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(frequencies, torch.softmax(logits / temperature, -1), atol=0.015, rtol=0)


def test_kv_cache_refuses_more_positions_than_it_holds():
    model = random_model()
    with pytest.raises(ValueError, match="max_length 2000 exceeds the model context"):
        KVCache.for_model(model.config, batch_size=1, max_length=2000)
    cache = KVCache.for_model(model.config, batch_size=1, max_length=4)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    with pytest.raises(ValueError, match="5 positions exceed the cache size"):
        model(torch.tensor([[4, 5]]), cache=cache)


def test_input_checks():
    model = random_model()
    too_long = torch.zeros(1, model.config.n_positions + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="exceeds the model context of 1024"):
        model(too_long)
    with pytest.raises(ValueError, match="does not match input_ids"):
        model(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 4))
    with pytest.raises(ValueError, match="exceeds the model context"):
        generate(model, [[1] * 1000], SamplingConfig(max_new_tokens=100))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []])


def test_bf16_precision_keeps_trainable_parameters_fp32_and_stays_close():
    model = random_model()
    ids = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        reference = model(ids)["last_hidden_state"]
    for layer in model.h:
        layer.requires_grad_(False)
    model.set_precision("bf16")
    assert model.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    assert model.h[0].ln_1.weight.dtype == torch.float32  # LayerNorms stay fp32
    assert model.wte.weight.dtype == torch.float32  # still trainable, so fp32
    with torch.no_grad():
        low = model(ids)["last_hidden_state"]
    assert low.dtype == torch.float32
    assert (low - reference).abs().max() < 0.1 * reference.abs().max()
    model.set_precision("fp32")
    assert model.h[0].attn.c_attn.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        model.set_precision("fp8")


def test_precision_auto_and_explicit():
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"
    auto = resolve_precision("auto", cpu)
    assert auto in ("bf16", "fp32") and random_model().set_precision("auto").precision == auto
    with pytest.raises(ValueError, match="auto, fp32, bf16"):
        resolve_precision("half", cpu)


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device 'tpu'; use cpu, cuda, cuda:N or auto"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="device 'meta' is not supported"):
        resolve_device("meta")


def test_generation_command_line_errors_are_one_line(tmp_path, capsys):
    from models.generation import main

    assert main(["--model", str(tmp_path), "--prompt", "Hi"]) == 1  # an empty directory: no checkpoint
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["--model", "random:tiny", "--prompt", "Hi", "--top-p", "0.9"])  # sampling flags without --sample
    assert "add --sample" in capsys.readouterr().err
