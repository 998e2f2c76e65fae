"""The course's submission conventions: file names, label values, the zip prepare_submit.py makes."""
from __future__ import annotations

import zipfile

import pytest

from data.course import (
    SUBMISSION_ZIP,
    course_mode,
    course_prediction_path,
    course_values,
    submission_files,
    write_submission_zip,
)


def test_course_file_names():
    from models.methods import get_method

    modes = {name: course_mode(get_method(name).family) for name in ("last-linear-layer", "full", "lora", "loreft")}
    assert modes == {"last-linear-layer": "last-linear-layer", "full": "full-model", "lora": "full-model",
                     "loreft": "full-model"}
    names = {(task, mode, split): course_prediction_path(task, mode, split).as_posix()
             for task in ("sst", "cfimdb", "quora", "sonnet") for mode in ("last-linear-layer", "full-model")
             for split in ("dev", "test")}
    assert names["sst", "last-linear-layer", "dev"] == "predictions/last-linear-layer-sst-dev-out.csv"
    assert names["cfimdb", "full-model", "test"] == "predictions/full-model-cfimdb-test-out.csv"
    assert names["quora", "full-model", "dev"] == names["quora", "last-linear-layer", "dev"] == \
        "predictions/para-dev-output.csv"
    assert names["quora", "full-model", "test"] == "predictions/para-test-output.csv"
    assert names["sonnet", "full-model", "test"] == "predictions/generated_sonnets.txt"
    assert course_prediction_path("sst", "full-model", "dev", "out").as_posix() == "out/full-model-sst-dev-out.csv"


def test_course_label_values():
    """The course's datasets.py labels Quora pairs with the token ids of "no" / "yes"; sentiment keeps classes."""
    assert course_values("quora", [0, 1, 1]) == [3919, 8505, 8505]
    assert course_values("sst", [4, 0]) == [4, 0]


def test_submission_zip_holds_what_prepare_submit_zips(tmp_path):
    with pytest.raises(FileNotFoundError, match="no predictions to submit"):
        write_submission_zip(tmp_path)
    for name in ("train_sentiment.py", "predictions/para-dev-output.csv", "models/gpt2.py", "modules/lora.py",
                 "tasks/trainer.py", "data/readers.py", "models/__pycache__/gpt2.cpython-311.pyc", "README.md",
                 "bench/run.py", "predictions/.hidden"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    expected = ["data/readers.py", "models/gpt2.py", "modules/lora.py", "predictions/para-dev-output.csv",
                "tasks/trainer.py", "train_sentiment.py"]
    assert sorted(p.as_posix() for p in submission_files(tmp_path)) == expected
    archive = write_submission_zip(tmp_path)
    assert archive == tmp_path / SUBMISSION_ZIP == tmp_path / "cs224n_default_final_project_submission.zip"
    with zipfile.ZipFile(archive) as opened:
        # prepare_submit.py names members ./<path>, which zipfile stores as <path>: the same names here.
        assert sorted(opened.namelist()) == expected
        assert all(opened.read(name).decode() == name for name in expected)
