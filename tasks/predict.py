"""Evaluates a saved run's best model on dev and writes its dev and test predictions, knowing the task, data,
base model and method from the run directory:

    python -m tasks.predict runs/sst-loreft                     # dev metrics printed; predictions/ written
    python -m tasks.predict runs/quora-lora --course-names      # predictions/para-dev-output.csv, ...

Prediction files are written atomically, under the names the training run used (or the course's)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Optional, Sequence

from models.gpt2 import PRECISION_CHOICES, PRECISION_HELP
from models.peft import find_gpt2
from tasks.cli import positive_int
from tasks.saved_run import SavedRun, open_run


def predict_run(run: SavedRun, *, data_dir: Optional[str] = None, predictions_dir: Optional[str] = None,
                course_names: Optional[bool] = None, max_eval_examples: Optional[int] = None,
                eval_batch_size: Optional[int] = None, say=print) -> dict:
    """Predicts dev and test with the loaded run, writes both files and returns {"dev": metrics, "paths": ...}.
    Arguments left None keep the run's settings."""
    changes = {"data_dir": data_dir, "predictions_dir": predictions_dir, "course_names": course_names,
               "max_eval_examples": max_eval_examples, "eval_batch_size": eval_batch_size}
    config = dataclasses.replace(run.config, **{k: v for k, v in changes.items() if v is not None},
                                 max_train_examples=1)  # the training split is read, not used: tokenise one row
    if predictions_dir is not None or course_names is not None:
        config.prediction_files = {}  # files the run named one by one (--para_dev_out ...) give way to the request
    task, model = run.task, run.model
    data = task.load(config, run.tokenizer, config.max_length or find_gpt2(model).config.n_positions)
    for note in data.notes:
        say(note)
    result = {"dev": {}, "paths": {}}
    for split in ("dev", "test"):
        examples = data.splits[split]
        if not examples:
            say(f"  no {split} examples ({data.paths[split]}): no {split} predictions")
            continue
        predictions = task.predict(model, examples, config, run.device)
        path = task.output_path(config, split)
        task.write_output(config, path, examples, predictions)
        result["paths"][split] = str(path)
        if split == "dev":
            result["dev"] = task.metrics(examples, predictions)
    score = f"dev {task.describe(result['dev'])}" if result["dev"] else "no dev labels"
    say(f"{task.name} / {config.method_name} ({run.run_dir}): {score}; predictions: "
        + (", ".join(result["paths"].values()) or "none"))
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Evaluate a saved run's best model on dev and write its dev and "
                                     "test predictions (the task, data, model and method come from the run).")
    parser.add_argument("run_dir", help="a run directory written by train_*.py (its --output-dir)")
    parser.add_argument("--data-dir", default=None, help="the data files (default: the run's)")
    parser.add_argument("--predictions-dir", default=None, help="where prediction files go (default: the run's)")
    parser.add_argument("--course-names", action="store_true",
                        help="the CS224n file names and label values (predictions/para-dev-output.csv, ...)")
    parser.add_argument("--max-eval-examples", type=positive_int, default=None, help="the first N dev / test examples only")
    parser.add_argument("--eval-batch-size", type=positive_int, default=None, help="examples per batch (default: the run's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default=None, help=PRECISION_HELP
                        + " (default: the run's)")
    parser.add_argument("--model", default=None, help="the base checkpoint, when it is no longer where the run "
                        "found it (its weights must be the same)")
    parser.add_argument("--tokenizer", default=None, help="the tokenizer directory (default: the run's)")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="load the adapter even onto a base with other weights than the one it was trained on")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run = open_run(Path(args.run_dir), device=args.device, precision=args.precision, model=args.model,
                       tokenizer=args.tokenizer, allow_other_base=args.allow_other_base)
        predict_run(run, data_dir=args.data_dir, predictions_dir=args.predictions_dir,
                    course_names=True if args.course_names else None, max_eval_examples=args.max_eval_examples,
                    eval_batch_size=args.eval_batch_size)
    except (ValueError, OSError) as error:  # a missing or foreign run, bad data, another base, an offline hub
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
