"""Shared test fixtures. Tests never touch the network; the development files in ../shared are used when
present (CI has them) and the tests that need them are skipped with a reason otherwise. The helpers the
tests import (paths, models, data, command lines) are in tests/fixtures/."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.shared import SHARED_TOKENIZER
from tests.fixtures.task_files import TaskFiles, tiny_vocabulary_model, tokenizer_dir, write_data_dir


@pytest.fixture(autouse=True)
def _offline_and_seeded(monkeypatch):
    # A test that accidentally reaches for the hub fails fast instead of waiting on retries.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Toy-sized matmuls gain nothing from a second thread, and on a busy machine waiting for one costs ~10x.
    Requested by the optimizer test, and by every test of the modules that run the task scripts (with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def task_files(tmp_path_factory) -> TaskFiles:
    """The data directory, tokenizer and model of the task and trainer tests."""
    root = tmp_path_factory.mktemp("task-files")
    tokenizer = tokenizer_dir(root)
    model = "random:tiny" if tokenizer == SHARED_TOKENIZER else tiny_vocabulary_model(root / "model", tokenizer)
    return TaskFiles(write_data_dir(root / "data"), tokenizer, model)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, task_files):
    """trained_run(task, method="lora") -> the directory of a finished one-epoch run on a tiny model, trained once
    a session (tests must not change it: write predictions elsewhere)."""
    from tests.fixtures.runs import train_run

    root, runs = tmp_path_factory.mktemp("trained-runs"), {}

    def get(task: str, method: str = "lora"):
        if (task, method) not in runs:
            runs[task, method] = train_run(root, task_files, task, method)
        return runs[task, method]
    return get
