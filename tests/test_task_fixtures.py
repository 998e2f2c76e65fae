"""Small data sets and a tokenizer for the task and trainer tests, plus checks that they read back.

With ../shared present the data are the first rows of the real development files (so the real formats,
test-student double index included, go through the scripts); without it, rows in the same formats are
written here. The tokenizer is the real GPT-2 one when present, else tests/tiny_tokenizer.py's.
"""
from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path
from typing import NamedTuple, Optional, Union

import pytest
import torch

from data.readers import (
    ParaphraseExample,
    SentimentExample,
    default_paths,
    read_paraphrase,
    read_sentiment,
    read_sonnets,
    write_paraphrase,
    write_sentiment,
)
from tests.conftest import SHARED_DATA, SHARED_TOKENIZER
from tests.tiny_tokenizer import write_tiny_tokenizer

ROWS = {"train": 24, "dev": 12, "test": 8}
SONNETS = 8
WORDS = ("the film is a good bad fine dull moving story with no yes heart and plot as long"
         " short great poor actor scene").split()


def shared_data_present() -> bool:
    return all(path.is_file() for task in ("sst", "cfimdb", "quora", "sonnet")
               for split, path in default_paths(task, SHARED_DATA).items() if split != "test" or task != "quora")


def tokenizer_dir(root: Path) -> Path:
    if (SHARED_TOKENIZER / "vocab.json").is_file():
        return SHARED_TOKENIZER
    return write_tiny_tokenizer(root / "tokenizer")


def write_data_dir(directory: Path, rows: dict = ROWS, sonnets: int = SONNETS) -> Path:
    """Data files for every task in `directory`: the first rows of the shared files, or synthetic ones."""
    directory.mkdir(parents=True, exist_ok=True)
    for task in ("sst", "cfimdb", "quora"):
        for split, target in default_paths(task, directory).items():
            source = default_paths(task, SHARED_DATA)[split]
            if shared_data_present():
                if source.is_file():
                    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
                    target.write_text("".join(lines[:1 + rows[split]]), encoding="utf-8")
            elif not (task == "quora" and split == "test"):
                write_synthetic_table(task, split, target, rows[split])
    write_sonnet_files(directory, sonnets)
    return directory


def synthetic_sentence(index: int, length: int) -> str:
    return " ".join(WORDS[(index * 7 + k * 3) % len(WORDS)] for k in range(length))


def write_synthetic_table(task: str, split: str, path: Path, count: int) -> None:
    labelled = split != "test"
    if task == "quora":
        write_paraphrase(path, [ParaphraseExample(f"{split}{i}", synthetic_sentence(i, 4 + i % 5) + "?",
                                                  synthetic_sentence(i + 1, 3 + i % 4) + "?", i % 2)
                                for i in range(count)])
        return
    classes = 5 if task == "sst" else 2
    write_sentiment(path, [SentimentExample(f"{split}{i}", synthetic_sentence(i, 3 + i % 9),
                                            i % classes if labelled else None) for i in range(count)])


def write_sonnet_files(directory: Path, count: int) -> None:
    paths = default_paths("sonnet", directory)
    if shared_data_present():
        text = default_paths("sonnet", SHARED_DATA)["train"].read_text(encoding="utf-8")
        cut = re.search(rf"^\s*{count + 1}\s*$", text, flags=re.MULTILINE)
        paths["train"].write_text(text[:cut.start()] if cut else text, encoding="utf-8")
        for split in ("dev", "dev_true", "test"):
            shutil.copy(default_paths("sonnet", SHARED_DATA)[split], paths[split])
        return
    def sonnet(number: int, lines: int) -> str:
        return f"\n{number}\n\n" + "\n".join(synthetic_sentence(number + k, 6 + k % 3) + "," for k in range(lines)) + "\n"
    header = "Sonnets\nby a test\n\n"
    paths["train"].write_text(header + "".join(sonnet(n, 14) for n in range(1, count + 1)), encoding="utf-8")
    held_out = range(200, 204)
    full = header + "".join(sonnet(n, 14) for n in held_out)
    paths["dev_true"].write_text(full, encoding="utf-8")
    paths["dev"].write_text(header + "".join(sonnet(n, 3) for n in held_out), encoding="utf-8")
    paths["test"].write_text(header + "".join(sonnet(n, 3) for n in range(300, 303)), encoding="utf-8")


class TaskFiles(NamedTuple):
    data: Path
    tokenizer: Optional[Path]
    model: Union[str, Path]  # random:tiny with the real tokenizer; else a tiny model with the tiny vocabulary


def tiny_vocabulary_model(directory: Path, tokenizer: Path) -> Path:
    """A random tiny GPT-2 whose vocabulary is the tiny tokenizer's, with the tokenizer files beside it: what
    generation needs (a larger model vocabulary would sample ids the tokenizer cannot decode)."""
    from models.config import GPT2Config
    from models.gpt2 import GPT2Model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        vocab_size = len(json.loads((tokenizer / "vocab.json").read_text(encoding="utf-8")))
        GPT2Model(GPT2Config.preset("tiny", vocab_size=vocab_size)).save_pretrained(directory)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tokenizer / name, directory / name)
    return directory


def base_args(tmp_path: Path, files: TaskFiles, **overrides) -> list[str]:
    """Command-line arguments for a quick run on a tiny model: LoRA (few parameters to update and save), fp32
    (faster than bf16 at this toy width), no dropout (runs comparable step for step), one epoch, small batches."""
    options = {"model": files.model, "method": "lora", "tokenizer": files.tokenizer, "data-dir": files.data,
               "output-dir": tmp_path / "run",
               "predictions-dir": tmp_path / "predictions", "precision": "fp32", "epochs": 1, "batch-size": 4,
               "dropout": 0.0, "device": "cpu"}
    options.update({key.replace("_", "-"): value for key, value in overrides.items()})
    args = []
    for key, value in options.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not None and value is not False:
            args += [f"--{key}", str(value)]
    return args


def run_script(script: str, args: list[str]) -> tuple[int, str, str]:
    """Runs train_<script>.py's main in this process; returns (exit code, stdout, stderr)."""
    from tasks.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(script, args)
        except SystemExit as exit:  # argparse errors
            code = exit.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def one_thread():
    """Toy-sized matmuls gain nothing from a second thread, and on a busy machine waiting for one costs ~10x."""
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


# ------------------------------------------------------------------------------------ the fixtures read back
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
