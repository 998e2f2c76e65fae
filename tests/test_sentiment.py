"""tasks.sentiment: texts longer than --max-length keep their end, and the script says how many were cut."""
from __future__ import annotations

import pytest

from data.readers import default_paths, read_sentiment
from tasks import get_task
from tasks.cli import parse_args
from tests.fixtures.task_files import base_args, run_script, tokenizer_of

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]


def test_long_texts_keep_their_end_and_are_counted(tmp_path, task_files):
    config = parse_args("sst", base_args(tmp_path, task_files, max_length=6))
    task = get_task("sst")
    data = task.load(config, tokenizer_of(task_files), max_length=6)
    assert all(example.length <= 6 for split in data.splits.values() for example in split)
    assert data.truncated["train"] > 0
    tokenizer = tokenizer_of(task_files)
    row = read_sentiment(default_paths("sst", task_files.data)["train"])[0]
    assert data.splits["train"][0].input_ids == tokenizer.encode(row.text)[-6:]
    code, out, err = run_script("sentiment", base_args(tmp_path / "cli", task_files, max_length=6))
    assert code == 0, err
    assert "train texts were longer than 6 tokens and were truncated" in out
