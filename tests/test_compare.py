"""compare.py end to end on a tiny random model: the table, comparison.csv / .json / .png, one run directory per
method, per-method flags, a failing method recorded beside the others, --resume reusing finished runs, and the
command-line errors raised before anything trains."""
from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch

from comparison.report import human_bytes, human_number, human_percent
from compare import main, parse_command
from models.gpt2 import GPT2Model
from models.peft import MethodConfig, apply_method, parameter_summary
from models.tokenizer import GPT2Tokenizer
from tasks import get_task
from tests.fixtures.task_files import base_args

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]
METHODS = ["last-linear-layer", "lora", "loreft"]
HEADERS = ["method", "trainable params", "trainable %", "adapter size", "dev accuracy", "dev macro_f1", "s/epoch",
           "train tokens/s", "peak memory", "ms/example", "lr", "status"]
CSV_FIELDS = ["method", "status", "trainable_params", "total_params", "trainable_percent", "adapter_bytes",
              "dev_accuracy", "dev_macro_f1", "epoch_seconds", "train_tokens_per_second", "peak_memory_bytes",
              "inference_ms_per_example", "lr", "own_flags", "error"]


def compare_args(out, task_files, methods, *extra, **overrides) -> list[str]:
    """The shared flags of the task tests' quick runs (compare.py sets --method, --output-dir, --predictions-dir)."""
    shared = base_args(out, task_files, method=None, output_dir=None, predictions_dir=None, max_train_examples=8,
                       max_eval_examples=6, **overrides)
    return ["--task", "sst", "--methods", ",".join(methods), "--output-dir", str(out), *shared, *extra]


def run_compare(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_lines(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ")]


@pytest.fixture(scope="module")
def compared(tmp_path_factory, task_files):
    """One comparison of three methods, each in its own process (the default), shared by the tests that read
    its outputs."""
    out = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(compare_args(out, task_files, METHODS))
    finally:
        torch.set_num_threads(threads)
    return code, out


@pytest.mark.slow  # the comparison: three methods, three processes
def test_table_has_a_row_per_method_with_readable_numbers(compared, capsys, task_files):
    code, out = compared
    assert code == 0
    # The table printed is the one recomputed from comparison.json on a --resume that reuses every run.
    code, printed, _ = run_compare(compare_args(out, task_files, METHODS, "--resume"), capsys)
    assert code == 0 and printed.count("finished earlier, result reused") == 3
    header, *rows = table_lines(printed)
    assert header == HEADERS
    assert [row[0] for row in rows] == METHODS and all(row[-1] == "finished" for row in rows)
    for row in rows:
        assert row[1].replace(",", "").isdigit() and row[2].endswith("%") and row[3].endswith("iB")
        assert 0 <= float(row[4]) <= 1 and row[8].endswith("iB") and row[10] == "0.001"


@pytest.mark.slow
def test_csv_and_json_hold_the_raw_numbers_and_the_full_results(compared, task_files):
    _, out = compared
    with open(out / "comparison.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_FIELDS
        csv_rows = list(reader)
    assert [row["method"] for row in csv_rows] == METHODS
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["settings"]["task"] == "sst" and saved["settings"]["max_train_examples"] == 8
    tokenizer = GPT2Tokenizer.from_pretrained(task_files.tokenizer)
    for run, row, csv_row in zip(saved["runs"], saved["rows"], csv_rows):
        result = run["result"]
        assert run["error"] is None and result["stopped"] == "finished" and result["epoch_seconds"]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gpt = GPT2Model.from_pretrained(str(task_files.model))
        apply_method(gpt, MethodConfig.from_dict(run["config"]["method"]))
        summary = parameter_summary(get_task("sst").build_model(gpt, tokenizer))
        assert (result["trainable_params"], result["total_params"]) == (summary["trainable"], summary["total"])
        assert row["trainable_params"] == int(csv_row["trainable_params"]) == summary["trainable"]
        assert row["trainable_percent"] == pytest.approx(summary["percent"])
        assert row["dev_accuracy"] == result["dev_metrics"]["accuracy"] == float(csv_row["dev_accuracy"])
        assert row["adapter_bytes"] == result["adapter_bytes"] > 4 * summary["trainable"]
        assert row["inference_ms_per_example"] == pytest.approx(1000 * result["inference_seconds_per_example"])
        assert row["lr"] == run["config"]["learning_rate"] == 1e-3


@pytest.mark.slow
def test_plot_and_one_run_directory_per_method(compared):
    _, out = compared
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in METHODS:
        assert (out / method / "log.json").is_file() and (out / method / "best" / "adapter.safetensors").is_file()
        assert (out / method / "predictions" / f"{method}-sst-dev-out.csv").is_file()


@pytest.mark.slow  # trains twice
def test_a_failing_method_is_recorded_and_the_others_still_run_and_resume_retries_it(tmp_path, task_files, capsys):
    args = compare_args(tmp_path, task_files, ["lora", "loreft"], "--in-process", "--method-args", "lora=--lr 1e30")
    code, printed, err = run_compare(args, capsys)
    assert code == 1
    assert "lora failed: TrainingDiverged: training stopped: the loss" in err + printed
    rows = {row[0]: row for row in table_lines(printed)[1:]}
    # The last column says what a method ran with beyond the shared flags (--method-args).
    assert rows["lora"][-2:] == ["failed", "--lr 1e30"] and rows["lora"][1] == "-" and rows["lora"][10] == "1e+30"
    assert rows["loreft"][-2:] == ["finished", "-"]
    saved = json.loads((tmp_path / "comparison.json").read_text())
    lora, loreft = saved["runs"]
    assert lora["result"] is None and lora["error"].startswith("TrainingDiverged")
    assert loreft["error"] is None and loreft["result"]["trainable_params"] > 0
    # --resume with a saner lr: the failed method starts again, the finished one is reused as it was.
    code, printed, _ = run_compare(compare_args(tmp_path, task_files, ["lora", "loreft"], "--resume", "--in-process"), capsys)
    assert code == 0 and "loreft: finished earlier" in printed and "lora: finished earlier" not in printed
    again = json.loads((tmp_path / "comparison.json").read_text())["runs"]
    assert again[0]["result"]["stopped"] == "finished" and again[1] == loreft


def test_method_flags_go_to_the_methods_that_take_them(tmp_path, task_files):
    _, configs = parse_command(compare_args(tmp_path, task_files, ["full", "lora", "loreft"], "--rank", "2",
                                            "--lora-targets", "query", "--method-args", "loreft=--positions l1 --lr 0.01"))
    assert configs["full"].method.to_dict() == {"method": "full"} and configs["full"].learning_rate == 1e-5
    assert (configs["lora"].method.rank, configs["lora"].method.targets, configs["lora"].learning_rate) == (2, ("query",), 1e-3)
    assert (configs["loreft"].method.rank, configs["loreft"].method.positions, configs["loreft"].lr) == (2, "l1", 0.01)
    assert {c.seed for c in configs.values()} == {11711} and {c.max_train_examples for c in configs.values()} == {8}
    assert configs["lora"].run_dir == tmp_path / "lora" and configs["lora"].predictions_dir == str(tmp_path / "lora" / "predictions")


@pytest.mark.parametrize("methods, extra, message", [
    (["lora", "nope"], [], "argument --methods: unknown method 'nope'"),
    (["lora", "lora"], [], "list each method once"),
    (["full", "loreft"], ["--lora-targets", "query"], "--lora-targets applies to none of the methods full,loreft"),
    (["lora", "loreft"], ["--method-args", "lora=--epochs 3"], "every method must share epochs"),
    (["lora", "loreft"], ["--method-args", "bitfit=--lr 1"], "for one of the listed methods"),
    (["lora"], ["--method", "lora"], "--method is set by compare.py"),
    (["lora"], ["--predictions-dir", "elsewhere"], "--predictions-dir is set by compare.py"),
    (["lora"], ["--epochs", "-1"], "compare.py: error: argument --epochs: must be a positive integer"),
    (["lora", "loreft"], ["--data-dir", "nowhere"], "ids-sst-train.csv: directory does not exist"),
])
def test_bad_command_lines_fail_before_training(tmp_path, task_files, capsys, methods, extra, message):
    with pytest.raises(SystemExit) as exit:
        main(compare_args(tmp_path, task_files, methods, *extra))
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and err.count("error:") == 1
    assert "usage: compare.py" in err and "--methods" in err  # compare's own usage, whichever flag was wrong
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_an_earlier_run_is_neither_overwritten_nor_skipped_silently(compared, task_files, capsys):
    _, out = compared
    with pytest.raises(SystemExit):
        main(compare_args(out, task_files, METHODS))
    assert "earlier runs are there: pass --resume" in capsys.readouterr().err


def test_human_formatting():
    assert (human_bytes(500), human_bytes(289 * 1024 + 100), human_bytes(1.2 * 2**30)) == ("500 B", "289 KiB", "1.2 GiB")
    assert [human_percent(p) for p in (100.0, 0.0595, 0.0021, 0.04, 0, 1e-5)] == \
        ["100.0%", "0.059%", "0.0021%", "0.040%", "0%", "0.000010%"]
    assert [human_number(x) for x in (1234.4, 0.3123, 42.04, 2.0, 9.999, 99.96, 0)] == \
        ["1,234", "0.312", "42.0", "2.00", "10.0", "100", "0"]
    assert human_number(float("nan")) == "nan" and human_number(-0.00123) == "-0.00123"
