"""python -m tasks.prepare_submission RUN...: the course's files from saved runs, then its zip."""
from __future__ import annotations

import shutil
import zipfile

import pytest

from data.readers import SENTIMENT_COLUMN, read_predictions
from tasks.prepare_submission import main, prepare_submission

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def test_submission_from_runs(trained_run, tmp_path):
    sst, quora = trained_run("sst"), trained_run("quora")
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "gpt2.py").write_text("# code\n")
    result = prepare_submission([sst, quora], root=tmp_path, device="cpu", say=lambda *_: None)
    names = sorted(p.name for p in (tmp_path / "predictions").iterdir())
    assert names == ["full-model-sst-dev-out.csv", "full-model-sst-test-out.csv", "para-dev-output.csv"]
    assert read_predictions(tmp_path / "predictions" / "full-model-sst-dev-out.csv", SENTIMENT_COLUMN) == \
        read_predictions(sst / "predictions" / "lora-sst-dev-out.csv", SENTIMENT_COLUMN)
    with zipfile.ZipFile(result["zip"]) as archive:
        assert sorted(archive.namelist()) == ["models/gpt2.py"] + [f"predictions/{n}" for n in names]


def test_two_runs_for_one_file_are_refused(trained_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(trained_run("sst"), copy)
    assert main([str(trained_run("sst")), str(copy), "--root", str(tmp_path), "--device", "cpu"]) == 1
    assert "would both write full-model-sst-dev-out.csv" in capsys.readouterr().err
    assert not (tmp_path / "predictions").exists()
