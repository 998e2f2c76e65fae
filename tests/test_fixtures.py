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
