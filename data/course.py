"""The Stanford CS224n GPT-2 project's submission conventions: its prediction file names, its label values and
the zip its prepare_submit.py makes. Used by `--course-names` (training scripts, tasks.predict) and by
`python -m tasks.prepare_submission`; methods come in as their registry family (models/methods.py), so this
module knows no method.

What the course's scripts write (its public starter):
- classifier.py: `predictions/{fine_tune_mode}-{sst|cfimdb}-{dev|test}-out.csv`, fine_tune_mode being
  last-linear-layer or full-model; the predicted class indices.
- paraphrase_detection.py: `predictions/para-{dev|test}-output.csv`. Its datasets.py turns is_duplicate into the
  GPT-2 token ids of "no" / "yes" (3919 / 8505) and evaluation.py scores the argmax over the vocabulary against
  them, so the values in its files are those token ids, not 0 / 1.
- sonnet_generation.py: `predictions/generated_sonnets.txt` (the held-out test prompts continued).
- prepare_submit.py: `cs224n_default_final_project_submission.zip` with the top-level .py files and the files in
  predictions/, models/ and modules/, each stored as ./<path>.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

from data.atomic import atomic_save

COURSE_MODES = ("last-linear-layer", "full-model")
PARAPHRASE_TOKEN_IDS = (3919, 8505)  # label 0 ("no") and 1 ("yes") as the course writes them
SUBMISSION_ZIP = "cs224n_default_final_project_submission.zip"
ZIPPED_DIRECTORIES = ("predictions", "models", "modules")  # the course's; CODE_DIRECTORIES are this project's
CODE_DIRECTORIES = ("tasks", "data")  # what models/ and the scripts import: without them the code cannot run


# --fine-tune-mode: which registry family each course mode is. Every method that adapts GPT-2 itself is what the
# course calls full-model; only a method training the head alone is last-linear-layer.
MODE_FAMILIES = {"last-linear-layer": "head", "full-model": "base"}


def course_mode(family: str) -> str:
    """The course's fine-tune mode of a method of this registry family."""
    return COURSE_MODES[0] if family == MODE_FAMILIES[COURSE_MODES[0]] else COURSE_MODES[1]


def course_prediction_path(task: str, mode: str, split: str, directory: str | Path = "predictions") -> Path:
    """The course's name of a split's predictions of `task`; `mode` (COURSE_MODES) names sentiment files."""
    directory = Path(directory)
    if task in ("sst", "cfimdb"):
        return directory / f"{mode}-{task}-{split}-out.csv"
    if task == "quora":
        return directory / f"para-{split}-output.csv"
    if task == "sonnet":  # the course writes the test sonnets only; the dev ones get the name students use
        return directory / ("generated_sonnets.txt" if split == "test" else "generated_sonnets_dev.txt")
    raise ValueError(f"unknown task {task!r}")


def course_values(task: str, predictions: list) -> list:
    """Predictions as the course's files hold them: Quora's 0 / 1 become the token ids of "no" / "yes"."""
    if task == "quora":
        return [PARAPHRASE_TOKEN_IDS[int(p)] for p in predictions]
    return list(predictions)


def submission_files(root: str | Path) -> list[Path]:
    """What the submission zip holds, relative to `root`: the course's set (top-level .py files, predictions/,
    models/, modules/) and this project's tasks/ and data/ packages, so that the submitted code runs."""
    root = Path(root)
    files = sorted(p.relative_to(root) for p in root.glob("*.py") if p.is_file())
    for directory in ZIPPED_DIRECTORIES + CODE_DIRECTORIES:
        if (root / directory).is_dir():
            files += sorted(p.relative_to(root) for p in (root / directory).iterdir()
                            if p.is_file() and not p.name.startswith(".") and p.suffix != ".pyc")
    return files


def write_submission_zip(root: str | Path, target: str | Path | None = None) -> Path:
    """Writes the course's submission zip (members named ./<path>, as prepare_submit.py names them), atomically."""
    root = Path(root)
    target = Path(target) if target is not None else root / SUBMISSION_ZIP
    if not (root / "predictions").is_dir() or not any((root / "predictions").iterdir()):
        raise FileNotFoundError(f"{root / 'predictions'}: no predictions to submit; write them first "
                                "(python -m tasks.prepare_submission RUN_DIR ...)")

    def write(temp: Path) -> None:
        with zipfile.ZipFile(temp, "w") as archive:
            for path in submission_files(root):
                archive.write(root / path, os.path.join(".", path.as_posix()))

    atomic_save(write, target)
    return target
