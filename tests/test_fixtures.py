"""The task tests' fixtures (tests/fixtures/task_files.py, the `task_files` fixture) read back: the data
files with the project's readers, the command line with the scripts' parser."""
from __future__ import annotations

import pytest

from data.readers import default_paths, read_paraphrase, read_sentiment, read_sonnets
from tests.fixtures.task_files import ROWS, SONNETS, base_args

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fixture_data_reads_back_with_the_readers(task_files):
    data_dir = task_files.data
    for task, reader in (("sst", read_sentiment), ("cfimdb", read_sentiment), ("quora", read_paraphrase)):
        paths = default_paths(task, data_dir)
        assert len(reader(paths["train"])) == ROWS["train"]
        assert len(reader(paths["dev"])) == ROWS["dev"]
        if paths["test"].is_file():
            test = reader(paths["test"], require_labels=False)
            assert len(test) == ROWS["test"] and all(row.label is None for row in test)
    paths = default_paths("sonnet", data_dir)
    assert len(read_sonnets(paths["train"])) == SONNETS
    prompts, truths = read_sonnets(paths["dev"]), read_sonnets(paths["dev_true"])
    assert [s.number for s in prompts] == [s.number for s in truths]
    assert all(len(s.lines) == 3 for s in prompts) and all(len(s.lines) == 14 for s in truths)


def test_base_args_parse_into_the_config_they_describe(tmp_path, task_files):
    from tasks.cli import parse_args

    config = parse_args("sst", base_args(tmp_path, task_files, epochs=3, resume=True))
    assert (config.model, config.precision, config.epochs, config.batch_size, config.dropout, config.resume) == (
        str(task_files.model), "fp32", 3, 4, 0.0, True)
    assert config.run_dir == tmp_path / "run"


def test_real_weights_are_found_or_skipped_with_a_reason(tmp_path):
    """GPT2_WEIGHTS names the directory; without it, the hub cache; else a skip that says how to provide them.
    A variable naming no checkpoint is an error (a typo must not turn the run into skips)."""
    from models.gpt2 import GPT2Config, GPT2Model
    from tests.fixtures.real_weights import NOT_FOUND, WEIGHTS_ENV, locate_weights

    assert locate_weights({}, hub_lookup=lambda: None) == (None, NOT_FOUND)
    assert WEIGHTS_ENV in NOT_FOUND and "hub cache" in NOT_FOUND
    assert locate_weights({}, hub_lookup=lambda: tmp_path) == (tmp_path, "")
    with pytest.raises(ValueError, match=f"{WEIGHTS_ENV}={tmp_path}: .*no config.json"):
        locate_weights({WEIGHTS_ENV: str(tmp_path)}, hub_lookup=lambda: None)
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        locate_weights({WEIGHTS_ENV: str(tmp_path / "missing")})
    GPT2Model(GPT2Config.preset("tiny")).save_pretrained(tmp_path / "gpt2")
    assert locate_weights({WEIGHTS_ENV: str(tmp_path / "gpt2")}, hub_lookup=lambda: None) == (tmp_path / "gpt2", "")
    with pytest.raises(ValueError, match="not a file"):
        locate_weights({WEIGHTS_ENV: str(tmp_path / "gpt2" / "model.safetensors")})
