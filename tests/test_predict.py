"""python -m tasks.predict RUN_DIR: dev metrics printed, dev and test predictions written (run or course names)."""
from __future__ import annotations

import contextlib
import io
import json

import pytest

from data.readers import PARAPHRASE_COLUMN, read_predictions, read_sonnets
from tasks.predict import main
from tasks.saved_run import read_run_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # trains the runs it predicts with


def predict(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_predict_reproduces_the_runs_predictions_and_metrics(trained_run, tmp_path):
    run_dir = trained_run("sst")
    code, out, err = predict([run_dir, "--predictions-dir", tmp_path, "--device", "cpu"])
    assert code == 0, err
    final = json.loads((run_dir / "log.json").read_text())["final"]
    assert f"dev accuracy {final['dev']['accuracy']:.4f}, macro_f1 {final['dev']['macro_f1']:.4f}" in out
    for split in ("dev", "test"):
        name = f"lora-sst-{split}-out.csv"
        assert (tmp_path / name).read_text() == (run_dir / "predictions" / name).read_text()


def test_course_names_and_label_values(trained_run, tmp_path):
    run_dir = trained_run("quora")
    code, _, err = predict([run_dir, "--predictions-dir", tmp_path, "--course-names", "--device", "cpu"])
    assert code == 0, err
    ours = read_predictions(run_dir / "predictions" / "lora-para-dev-out.csv", column_name=PARAPHRASE_COLUMN)
    course = read_predictions(tmp_path / "para-dev-output.csv", column_name=PARAPHRASE_COLUMN)
    assert course == {k: (3919, 8505)[v] for k, v in ours.items()}
    assert (tmp_path / "para-dev-output.csv").read_text().splitlines()[1] == f"{next(iter(course))}, " \
        f"{next(iter(course.values()))} "

    code, _, err = predict([trained_run("sonnet"), "--predictions-dir", tmp_path, "--course-names",
                            "--device", "cpu"])
    assert code == 0, err
    test_prompts = read_sonnets(read_run_config(trained_run("sonnet")).data_paths()["test"])[:4]
    assert [s.number for s in read_sonnets(tmp_path / "generated_sonnets.txt")] == [s.number for s in test_prompts]
    assert len(read_sonnets(tmp_path / "generated_sonnets_dev.txt")) == 4  # the run's --max-eval-examples


def test_errors_are_one_line(tmp_path):
    code, _, err = predict([tmp_path / "nothing"])
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "no log.json here" in err
