"""models.generation: the KV cache changes nothing, greedy and sampled decoding, the stop token, top-k / top-p,
the temperature, and the command line's errors."""
from __future__ import annotations

import pytest
import torch

from models.generation import SamplingConfig, generate, next_token
from tests.fixtures.models import random_model


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


def test_generation_command_line_errors_are_one_line(tmp_path, capsys):
    from models.generation import main

    assert main(["--model", str(tmp_path), "--prompt", "Hi"]) == 1  # an empty directory: no checkpoint
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["--model", "random:tiny", "--prompt", "Hi", "--top-p", "0.9"])  # sampling flags without --sample
    assert "add --sample" in capsys.readouterr().err


@pytest.mark.slow  # trains a sonnet run and a sentiment run
def test_generation_command_with_a_trained_adapter(trained_run, tmp_path, capsys):
    """--adapter RUN/best applies the run's method and tensors to the base it records: greedy output equals the
    run's model loaded in Python; a classifier's adapter is refused with a reason."""
    from models.generation import generate_text, main
    from models.tokenizer import GPT2Tokenizer
    from tasks.saved_run import load_run, read_run_config

    run_dir = trained_run("sonnet")
    config = read_run_config(run_dir)
    args = ["--adapter", str(run_dir / "best"), "--tokenizer", config.tokenizer, "--prompt", "Shall I compare thee",
            "--max-new-tokens", "8", "--device", "cpu", "--precision", "fp32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    model = load_run(run_dir, precision="fp32")
    tokenizer = GPT2Tokenizer.from_pretrained(config.tokenizer)
    expected = generate_text(model, tokenizer, ["Shall I compare thee"],
                             SamplingConfig(max_new_tokens=8, stop_token_id=tokenizer.eos_token_id))[0]
    assert printed == f"Shall I compare thee{expected}\n\n"

    assert main(["--adapter", str(trained_run("sst") / "best"), "--tokenizer", config.tokenizer,
                 "--prompt", "x", "--device", "cpu"]) == 1
    assert "belongs to a classifier" in capsys.readouterr().err
