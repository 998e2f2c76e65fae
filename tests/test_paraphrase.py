"""tasks.paraphrase: the cloze head on the "no"/"yes" answer tokens, answer ids from the tokenizer, and the
prompt that cuts the questions, never the instruction."""
from __future__ import annotations

import pytest
import torch

from models.peft import MethodConfig, apply_method
from models.tokenizer import GPT2Tokenizer
import tasks.paraphrase
from tasks import get_task
from tasks.paraphrase import ANSWERS, PROMPT, answer_token_ids, encode_pair
from tests.fixtures.models import random_model
from tests.fixtures.task_files import tokenizer_of

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]


def test_paraphrase_head_starts_as_the_cloze_on_the_answer_tokens(task_files):
    tokenizer = tokenizer_of(task_files)
    torch.manual_seed(0)
    gpt = random_model("tiny")
    model = get_task("quora").build_model(apply_method(gpt, MethodConfig("last-linear-layer")), tokenizer)
    prompts = [encode_pair(tokenizer, "How do I learn?", "What is the way to learn?", 1024)[0],
               encode_pair(tokenizer, "Why?", "Is the sky blue?", 1024)[0]]
    ids = torch.full((2, max(map(len, prompts))), tokenizer.eos_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)], mask[row, :len(prompt)] = torch.tensor(prompt), 1
    with torch.no_grad():
        head_logits = model(ids, mask)
        vocabulary_logits = gpt.hidden_state_to_token(gpt(ids, mask)["last_token"])
    answers = answer_token_ids(tokenizer)
    torch.testing.assert_close(head_logits, vocabulary_logits[:, answers], rtol=1e-6, atol=1e-6)
    assert answers == [tokenizer.encode("no")[0], tokenizer.encode("yes")[0]] and ANSWERS == ("no", "yes")


def test_answer_tokens_come_from_the_tokenizer(task_files, tmp_path, monkeypatch):
    from tests.fixtures.tiny_tokenizer import write_tiny_tokenizer

    tiny = GPT2Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))
    assert answer_token_ids(tiny) == [259, 262]  # the tiny vocabulary's "no" and "yes"
    if tokenizer_of(task_files).vocab_size == 50257:
        assert answer_token_ids(tokenizer_of(task_files)) == [3919, 8505]  # the course's ids
    monkeypatch.setattr(tasks.paraphrase, "ANSWERS", ("nope", "yes"))
    with pytest.raises(ValueError, match="splits 'nope' into 3 tokens"):
        answer_token_ids(tiny)


def test_paraphrase_prompt_cuts_the_questions_never_the_instruction(task_files):
    tokenizer = tokenizer_of(task_files)
    instruction = sum(len(tokenizer.encode(piece)) for piece in PROMPT)
    limit = instruction + 24
    long_question = "why " * 300
    ids, cut = encode_pair(tokenizer, long_question, "Is it short?", max_length=limit)
    assert cut and len(ids) == limit
    text = tokenizer.decode(ids)
    assert text.startswith(PROMPT[0]) and text.endswith('"\nQuestion 2: "Is it short?' + PROMPT[2])
    ids, cut = encode_pair(tokenizer, long_question, long_question, max_length=limit)
    text = tokenizer.decode(ids)
    assert cut and len(ids) == limit and text.endswith(PROMPT[2])
    first, second = (len(tokenizer.encode(part)) for part in text[len(PROMPT[0]):-len(PROMPT[2])].split(PROMPT[1]))
    assert abs(first - second) <= 1  # both questions cut, equally
    short, cut = encode_pair(tokenizer, "A?", "B?", max_length=limit)
    assert not cut and tokenizer.decode(short) == PROMPT[0] + "A?" + PROMPT[1] + "B?" + PROMPT[2]
    with pytest.raises(ValueError, match=f"--max-length {instruction} is too short for the paraphrase prompt"):
        encode_pair(tokenizer, long_question, long_question, max_length=instruction)
