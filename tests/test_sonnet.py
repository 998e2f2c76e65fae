"""tasks.sonnet: the first three lines as the prompt, the language-model loss summed over real tokens only,
and decoding that drops ids the tokenizer cannot decode."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from data.readers import default_paths, read_sonnets
from models.tokenizer import GPT2Tokenizer
from tasks import get_task
from tasks.cli import parse_args
from tasks.sonnet import split_prompt
from tasks.task import Example
from tests.fixtures.models import random_model
from tests.fixtures.task_files import base_args, tokenizer_of

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]


def test_sonnet_examples_mark_their_first_three_lines_as_the_prompt(tmp_path, task_files):
    config = parse_args("sonnet", base_args(tmp_path, task_files))
    tokenizer = tokenizer_of(task_files)
    data = get_task("sonnet").load(config, tokenizer, max_length=1024)
    first = read_sonnets(default_paths("sonnet", task_files.data)["train"])[0]
    prompt, rest = split_prompt(first.text)
    example = data.splits["train"][0]
    assert prompt.count("\n") == 3 and prompt + rest == first.text + "\n"
    assert example.input_ids[:example.prompt_length] == tokenizer.encode(prompt)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert all(e.label is not None for e in data.splits["dev"]) and all(e.label is None for e in data.splits["test"])
    batch = get_task("sonnet").collate(data.splits["train"][:2], torch.device("cpu"))
    assert batch["prompt_mask"][0].sum() == example.prompt_length
    assert not (batch["prompt_mask"] & ~batch["attention_mask"].bool()).any()


def test_sonnet_loss_is_summed_over_real_tokens_only(tmp_path, task_files):
    config = parse_args("sonnet", base_args(tmp_path, task_files))
    task = get_task("sonnet")
    data = task.load(config, tokenizer_of(task_files), max_length=1024)
    torch.manual_seed(0)
    model = task.build_model(random_model("tiny"), tokenizer_of(task_files)).eval()
    examples = data.splits["train"][:3]
    with torch.no_grad():
        together = task.loss(model, task.collate(examples, torch.device("cpu")))
        alone = sum(task.loss(model, task.collate([e], torch.device("cpu"))) for e in examples)
        ids = torch.tensor([examples[0].input_ids])
        logits = model.hidden_state_to_token(model(ids)["last_hidden_state"])[0, :-1]
        direct = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(task.loss(model, task.collate(examples[:1], torch.device("cpu"))), direct,
                               rtol=1e-5, atol=1e-3)
    assert sum(task.loss_terms(e) for e in examples) == sum(e.length - 1 for e in examples)


def test_generation_drops_ids_the_tokenizer_cannot_decode(tmp_path, monkeypatch):
    """A model vocabulary larger than the tokenizer's (a padded embedding) must not crash the decoding: ids
    beyond the tokenizer's are dropped, every other one is kept."""
    from tests.fixtures.tiny_tokenizer import write_tiny_tokenizer
    import tasks.sonnet

    task = get_task("sonnet")
    task.tokenizer = GPT2Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))  # 269 ids; the model has 50257
    prompt = "the yes\nno the\nis a\n"
    example = Example(id="7", input_ids=task.tokenizer.encode(prompt), text=prompt)
    sampled = [262, 300, 40000, 259, 268 + 1]  # "yes", two ids beyond the tokenizer's, "no", one more beyond
    monkeypatch.setattr(tasks.sonnet, "generate", lambda *args, **kwargs: [sampled])
    config = parse_args("sonnet", ["--max-new-tokens", "30"])
    [text] = task.predict(random_model("tiny"), [example], config, torch.device("cpu"))
    assert text == prompt + "yesno"
