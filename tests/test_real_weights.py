"""Checks that need the real GPT-2 (124M) weights, for whoever has them:

    GPT2_WEIGHTS=/path/to/gpt2 python -m pytest -m real_weights      # or with gpt2 in the hub cache

Each test skips with the reason when no weights are found (the rest of the suite proves correctness on random
weights), so CI passes without them. They are also marked slow: `-m "not slow"` leaves them out.

- the same hidden states and logits as transformers on the real weights, in fp32;
- greedy continuations token for token equal to transformers' `generate`;
- the ReFT paper's memorisation test as it states it: a rank-1 LoReFT intervention on one layer, at the last
  prompt token only, trained with the full-vocabulary cross-entropy, makes greedy decoding reproduce a text;
- one epoch of each task (LoRA) whose dev score beats the majority class (sonnets: every prompt continued by
  the most frequent word of the training sonnets).
"""
from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from sacrebleu.metrics import CHRF

from models.generation import SamplingConfig, generate
from models.gpt2 import GPT2Model
from models.peft import MethodConfig, apply_method
from models.tokenizer import GPT2Tokenizer, pad_sequences
from tests.fixtures.real_weights import require_weights
from tests.fixtures.shared import SHARED_DATA

pytestmark = [pytest.mark.real_weights, pytest.mark.slow]
transformers = pytest.importorskip("transformers", reason="transformers is a test-only dependency")

TEXTS = ["Shall I compare thee to a summer's day?", "The quick brown fox jumps over the lazy dog because",
         "In 1905, Albert Einstein published"]
# What the memorisation test teaches: the opening of Sonnet 18 after a prompt the text does not follow from.
MEMORISE_PROMPT = "GO->"
MEMORISE_TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate: Rough winds do "
                 "shake the darling buds of May, And summer's lease hath all too short a date.")


@pytest.fixture(scope="module")
def real():
    weights, tokenizer_dir = require_weights()
    return weights, GPT2Tokenizer.from_pretrained(tokenizer_dir), tokenizer_dir


def test_matches_transformers_on_the_real_weights(real):
    weights, tokenizer, _ = real
    ours = GPT2Model.from_pretrained(weights)
    reference = transformers.GPT2LMHeadModel.from_pretrained(weights).eval()
    ids, mask = pad_sequences([tokenizer.encode(text) for text in TEXTS])  # right-padded, as the course's batches
    with torch.no_grad():
        expected = reference(ids, attention_mask=mask, output_hidden_states=True)
        got = ours(ids, mask)
        logits = ours.hidden_state_to_token(got["last_hidden_state"])
    for row in range(len(TEXTS)):
        real_tokens = int(mask[row].sum())
        torch.testing.assert_close(got["last_hidden_state"][row, :real_tokens],
                                   expected.hidden_states[-1][row, :real_tokens], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits[row, :real_tokens], expected.logits[row, :real_tokens], atol=1e-3, rtol=1e-4)


def test_greedy_continuations_equal_transformers(real):
    weights, tokenizer, _ = real
    ours = GPT2Model.from_pretrained(weights)
    reference = transformers.GPT2LMHeadModel.from_pretrained(weights).eval()
    prompts = [tokenizer.encode(text) for text in TEXTS]
    produced = generate(ours, prompts, SamplingConfig(max_new_tokens=24), pad_token_id=tokenizer.eos_token_id)
    for prompt, tokens in zip(prompts, produced):
        with torch.no_grad():
            expected = reference.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                                          do_sample=False, max_new_tokens=24, pad_token_id=tokenizer.eos_token_id)
        assert tokens == expected[0, len(prompt):].tolist(), tokenizer.decode(prompt)


def test_rank_1_loreft_at_the_last_prompt_token_memorises_a_text(real):
    weights, tokenizer, _ = real
    model = GPT2Model.from_pretrained(weights).set_dropout(0.0)
    layer = model.config.n_layer // 2  # layer 6 of gpt2's 12
    apply_method(model, MethodConfig("loreft", rank=1, layers=[layer], positions="l1"))
    prompt, text = tokenizer.encode(MEMORISE_PROMPT), tokenizer.encode(MEMORISE_TEXT)
    sequence = torch.tensor([prompt + text[:-1]])
    prompt_mask = torch.arange(sequence.shape[1])[None] < len(prompt)  # the intervention acts on the last of these
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=4e-3)
    produced = []
    for step in range(1, 1001):
        model.train()
        hidden = model(sequence, prompt_mask=prompt_mask)["last_hidden_state"][0, len(prompt) - 1:]
        loss = F.cross_entropy(model.hidden_state_to_token(hidden), torch.tensor(text))  # all 50,257 tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            produced = generate(model, [prompt], SamplingConfig(max_new_tokens=len(text)))[0]
            if produced == text:
                break
    assert produced == text, f"after {step} steps: {tokenizer.decode(produced)!r}"


def majority_accuracy(labels) -> float:
    return Counter(labels).most_common(1)[0][1] / len(labels)


@pytest.mark.parametrize("task", ["sst", "cfimdb", "quora", "sonnet"])
def test_one_epoch_beats_the_majority_class(real, task, tmp_path):
    """One epoch of LoRA on the task's training data (GPT2_SMOKE_EXAMPLES caps it, for CPUs), then dev."""
    from tasks.config import TrainConfig
    from tasks.trainer import run_training

    weights, _, tokenizer_dir = real
    data_dir = os.environ.get("GPT2_DATA_DIR", str(SHARED_DATA))
    if not (SHARED_DATA.is_dir() or "GPT2_DATA_DIR" in os.environ):
        pytest.skip(f"no data: set GPT2_DATA_DIR or provide {SHARED_DATA}")
    cap = int(os.environ["GPT2_SMOKE_EXAMPLES"]) if "GPT2_SMOKE_EXAMPLES" in os.environ else None
    config = TrainConfig(task=task, method=MethodConfig("lora"), model=str(weights), tokenizer=str(tokenizer_dir),
                         data_dir=data_dir, epochs=1, batch_size=8,
                         max_train_examples=cap, max_eval_examples=cap if task == "quora" else None,
                         output_dir=str(tmp_path / "run"), predictions_dir=str(tmp_path / "predictions"),
                         max_new_tokens=80)
    result = run_training(task, config)
    if task == "sonnet":
        from data.readers import read_sonnets
        from tasks.sonnet import split_prompt

        # The majority class of a language model: every prompt continued by the training continuations' most
        # frequent word, as many times as they have words on average (about 24 chrF, as the prompts alone score;
        # a real training sonnet after every prompt would score about 43, above strong students' ~41).
        paths = config.data_paths()
        continuations = [split_prompt(s.text)[1].split() for s in read_sonnets(paths["train"])]
        word = Counter(w for words in continuations for w in words).most_common(1)[0][0]
        constant = " ".join([word] * round(sum(map(len, continuations)) / len(continuations))) + "\n"
        prompts = [split_prompt(s.text)[0] for s in read_sonnets(paths["dev"])]
        references = [s.text for s in read_sonnets(paths["dev_true"])][:len(prompts)]
        baseline = CHRF().corpus_score([prompt + constant for prompt in prompts], [references]).score
        assert result.dev_metrics["chrf"] > baseline, (result.dev_metrics, baseline)
        return
    from data.readers import read_paraphrase, read_sentiment

    rows = (read_paraphrase if task == "quora" else read_sentiment)(config.data_paths()["dev"])[:config.max_eval_examples]
    baseline = majority_accuracy([int(row.label) for row in rows])
    assert result.dev_metrics["accuracy"] > baseline, (result.dev_metrics, baseline)
