"""A CS224n submission from saved runs: each run's dev and test predictions under the course's names and label
values in predictions/, then the zip the course's prepare_submit.py makes.

    python -m tasks.prepare_submission runs/sst-full runs/cfimdb-full runs/quora-lora runs/sonnet-lora

writes predictions/full-model-sst-dev-out.csv, ..., predictions/para-test-output.csv (when the Quora test file
is in the data directory), predictions/generated_sonnets.txt and cs224n_default_final_project_submission.zip.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from data.course import SUBMISSION_ZIP, course_mode, course_prediction_path, write_submission_zip
from tasks.predict import predict_run
from tasks.saved_run import open_run, read_run_config


def check_distinct(run_dirs: Sequence[Path]) -> None:
    """Two runs that would write the same course file (two SST runs of one mode) are refused before any work."""
    owners: dict[Path, Path] = {}
    for run_dir in run_dirs:
        config = read_run_config(run_dir)
        target = course_prediction_path(config.task, course_mode(config.method_family), "dev")
        if target in owners:
            raise ValueError(f"{owners[target]} and {run_dir} would both write {target.name}; give one run per "
                             "task (and per fine-tune mode for sentiment)")
        owners[target] = run_dir


def prepare_submission(run_dirs: Sequence[str | Path], root: str | Path = ".", data_dir: Optional[str] = None,
                       device: str = "auto", make_zip: bool = True, say=print) -> dict:
    """Writes each run's predictions into <root>/predictions/ with the course's names, then the zip (unless
    `make_zip` is False). Returns {"predictions": [paths], "zip": path or None}."""
    root, run_dirs = Path(root), [Path(r) for r in run_dirs]
    if not run_dirs:
        raise ValueError("give at least one run directory")
    check_distinct(run_dirs)
    written = []
    for run_dir in run_dirs:
        run = open_run(run_dir, device=device)
        result = predict_run(run, data_dir=data_dir, predictions_dir=str(root / "predictions"), course_names=True,
                             say=say)
        written += result["paths"].values()
    archive = write_submission_zip(root) if make_zip else None
    if archive is not None:
        say(f"submission: {archive}")
    return {"predictions": written, "zip": archive}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write the CS224n submission files (course names and label values) "
                                     f"from saved runs, then {SUBMISSION_ZIP}.")
    parser.add_argument("run_dirs", nargs="+", help="run directories written by train_*.py, one per task")
    parser.add_argument("--root", default=".", help="the project directory: predictions/ and the zip go there, and "
                        "the zip takes its code from there")
    parser.add_argument("--data-dir", default=None, help="the data files (default: each run's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--no-zip", action="store_true", help="write the prediction files only")
    args = parser.parse_args(argv)
    try:
        prepare_submission(args.run_dirs, args.root, args.data_dir, args.device, make_zip=not args.no_zip)
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
