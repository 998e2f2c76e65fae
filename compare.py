"""Compare fine-tuning methods on one task with the same data, budget and seed, in one table.

    python compare.py --task sst --methods full,last-linear-layer,lora,reft,loreft --epochs 3
    python compare.py --task sst --methods full,lora,loreft --model random:tiny --tokenizer ../shared/gpt2-tokenizer \\
        --data-dir ../shared/data --epochs 1 --max-train-examples 500          # a quick smoke run
    python compare.py --task cfimdb --methods lora,loreft --rank 4 \\
        --method-args "lora=--lr 5e-4 --lora-targets query,value"

Every flag of the task's training script (`python train_sentiment.py --help`) goes to every run; a method flag
(--rank, --positions, --lora-targets, ...) only to the methods that take it. --method-args METHOD="FLAGS" gives
one method its own flags (learning rate, rank, ...); the budget and the seed stay shared. Each method trains with
tasks.trainer.run_training, in a fresh process (--in-process: in this one), in <output-dir>/<method>/, predictions in <output-dir>/<method>/predictions/. The
table is printed and written to <output-dir>/comparison.csv and comparison.json (raw numbers, settings and every
run's full result), with comparison.png (dev metric against trainable parameters). A failing method is recorded
and the others still run (exit code 1). --resume reuses finished runs and continues interrupted ones.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib
import json
import math
import multiprocessing
import shlex
import statistics
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from data.atomic import atomic_save, atomic_write
from data.readers import DataFormatError, check_file, default_paths
from models.methods import flag_options, get_method, method_names, registered_methods
from tasks import TASK_NAMES, get_task
from tasks import checkpoint as ckpt
from tasks.cli import SCRIPTS, build_parser, config_from_args, method_config_from_args, option_dest, script_of
from tasks.trainer import TrainingDiverged, run_training
# What every method shares, or the comparison would not be fair: --method-args may not change these.
SHARED = ("model", "tokenizer", "data_dir", "epochs", "batch_size", "grad_accum", "max_length", "max_train_examples",
          "max_eval_examples", "seed", "device", "precision", "patience", "eval_every")
FINISHED = ("finished", "early stopping", "already finished")


# ----------------------------------------------------------------------------------------------- command line
def method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    for m in methods:
        if m not in method_names():
            raise argparse.ArgumentTypeError(f"unknown method {m!r}; choose among {', '.join(method_names())}")
    if not methods or len(set(methods)) < len(methods):
        raise argparse.ArgumentTypeError(f"list each method once, comma-separated; got {text!r}")
    return methods


def parse_command(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, dict]:
    """Compare's own flags, and the TrainConfig of each method (all validated before anything trains)."""
    own = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                                  epilog="Any other flag is a training flag: see the task's script, " + ", ".join(
                                      f"{' and '.join(tasks)}: python train_{script}.py --help"
                                      for script, tasks in SCRIPTS.items()) + ".")
    own.add_argument("--task", required=True, choices=TASK_NAMES)
    own.add_argument("--methods", required=True, type=method_list, help=f"comma-separated, among {', '.join(method_names())}")
    own.add_argument("--output-dir", help="where the runs and the comparison go (default: runs/compare-<task>)")
    own.add_argument("--in-process", action="store_true",
                     help="train every method in this process (faster start; peak memory then includes what "
                     "earlier methods left behind)")
    own.add_argument("--method-args", action="append", default=[], metavar='METHOD="FLAGS"',
                     help='training flags for one method only, e.g. "lora=--lr 5e-4 --rank 16" (repeatable)')
    args, rest = own.parse_known_args(argv)
    args.output_dir = Path(args.output_dir or f"runs/compare-{args.task}")
    extra = {m: [] for m in args.methods}
    for item in args.method_args:
        method, _, flags = item.partition("=")
        if method.strip() not in extra:
            own.error(f"--method-args {item!r}: give METHOD=FLAGS for one of the listed methods ({','.join(extra)})")
        extra[method.strip()] += shlex.split(flags)

    # The task script's parser, with no default for the flags compare sets itself (so that giving them is caught).
    parser = build_parser(script_of(args.task), default_task=args.task)
    parser.set_defaults(method=None, predictions_dir=None)
    parser.error = own.error  # a bad training flag is reported with compare.py's usage, not the script's

    def parse_run_flags(tokens: list[str]) -> argparse.Namespace:
        ns = parser.parse_args(tokens)
        for flag in ("method", "output_dir", "predictions_dir"):
            if getattr(ns, flag) is not None:
                own.error(f"--{flag.replace('_', '-')} is set by compare.py: use --methods and --output-dir (each "
                          "method runs in <output-dir>/<method>)")
        return ns

    shared = parse_run_flags(rest)
    takes = {m: get_method(m).options for m in args.methods}
    unused = [option.flag for option in flag_options() if getattr(shared, option_dest(option)) is not None
              and not any(option.name in takes[m] for m in args.methods)]
    if unused:
        own.error(f"{', '.join(unused)} applies to none of the methods {','.join(args.methods)}")
    configs = {}
    for m in args.methods:
        ns, own_flags = parse_run_flags(rest + extra[m]), parse_run_flags(extra[m])
        for option in flag_options():
            if getattr(own_flags, option_dest(option)) is None and option.name not in takes[m]:
                setattr(ns, option_dest(option), None)  # a shared flag meant for the other methods
        ns.method, ns.output_dir = m, str(args.output_dir / m)
        ns.predictions_dir = str(args.output_dir / m / "predictions")
        try:
            method_config_from_args(ns)
        except ValueError as error:
            own.error(f"{m}: {error}")
        configs[m] = config_from_args(ns, parser)
    for name in SHARED:
        values = {m: getattr(c, name) for m, c in configs.items()}
        if len(set(map(str, values.values()))) > 1:
            own.error(f"every method must share {name}, but --method-args gives {values}")
    taken = [str(c.run_dir) for c in configs.values() if not (c.resume or c.overwrite)
             and any((c.run_dir / name).exists() for name in ckpt.RUN_FILES)]
    if taken:
        own.error(f"{', '.join(taken)}: earlier runs are there: pass --resume (finished runs are reused, interrupted ones "
                  "continued), --overwrite, or another --output-dir")
    first = next(iter(configs.values()))
    for split in ("train", "dev"):  # shared by every run: one clear error now rather than one per method later
        try:
            check_file(default_paths(first.task, first.data_dir)[split])
        except DataFormatError as error:
            own.error(str(error))
    args.own_flags = {m: shlex.join(flags) for m, flags in extra.items() if flags}
    return args, configs


# ----------------------------------------------------------------------------------------------- running
def comparable(config) -> dict:
    """The config as JSON, without the flags that only say how to start it."""
    out = config.to_dict()
    del out["resume"], out["overwrite"]
    return json.loads(json.dumps(out))


def run_one(method: str, config) -> dict:
    entry = {"method": method, "config": comparable(config), "result": None, "error": None}
    try:
        entry["result"] = run_training(config.task, config).to_dict()
    except Exception as error:  # one method's failure must not cost the others' results
        if not isinstance(error, (TrainingDiverged, ValueError, OSError)):
            traceback.print_exc()
        entry["error"] = f"{type(error).__name__}: {error}"
        print(f"{method} failed: {entry['error']}", file=sys.stderr)
    return entry


def run_isolated(method: str, config) -> dict:
    """run_one in a fresh process, so that each method's peak memory is its own (on a CPU the peak RSS of a
    process only grows: memory an earlier method used stays counted)."""
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch threads or state
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(method, config, send, plugin_modules()), name=f"compare-{method}")
    child.start()
    send.close()  # the child holds the only writing end: its exit ends recv() with EOFError
    try:
        return receive.recv()
    except EOFError:
        child.join()
        error = f"the training process exited with code {child.exitcode} before reporting a result"
        print(f"{method} failed: {error}", file=sys.stderr)
        return {"method": method, "config": comparable(config), "result": None, "error": error}
    finally:  # also on Ctrl-C, which reaches the child too: never leave it behind
        child.join(timeout=10)
        if child.is_alive():
            child.terminate()
            child.join()
        receive.close()


def plugin_modules() -> list[str]:
    """The modules that registered methods beyond the built-in ones: a fresh process imports them too, so that it
    knows every method this one does (a script's own __main__ is re-run by multiprocessing itself)."""
    return sorted({m.apply.__module__ for m in registered_methods()} - {"models.methods", "__main__", "__mp_main__"})


def _child(method: str, config, send, modules: list[str]) -> None:
    try:
        for module in modules:
            importlib.import_module(module)
        send.send(run_one(method, config))
    except KeyboardInterrupt:
        pass  # the parent reports the interruption once
    finally:
        send.close()


def reusable(entry: Optional[dict], config) -> bool:
    """An earlier comparison's result for this very run, which has finished."""
    log = config.run_dir / "log.json"
    return bool(entry and entry["error"] is None and entry["config"] == comparable(config) and log.is_file()
                and json.loads(log.read_text()).get("status") in FINISHED)


# ----------------------------------------------------------------------------------------------- the table
def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024


def human_number(x: float) -> str:
    """Three significant figures, trailing zeros kept so a column reads evenly: 1,234 / 56.7 / 2.00 / 0.123."""
    if not math.isfinite(x) or x == 0:
        return str(x) if x else "0"
    x = float(f"{x:.3g}") if abs(x) < 100 else x  # round first: 9.999 reads 10.0, not 10.00
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def human_percent(p: float) -> str:
    if p >= 1 or p == 0:
        return f"{p:.1f}%" if p else "0%"
    return f"{p:.{1 - math.floor(math.log10(p))}f}%"  # two significant figures, trailing zero kept: 0.040%


def table_rows(entries: list[dict], metric: str, own_flags: Optional[dict] = None) -> tuple[list[dict], list[tuple]]:
    """One row of raw numbers per method, and the columns as (key, header, formatter; None for text)."""
    own_flags = own_flags or {}
    results = [e["result"] for e in entries if e["result"]]
    others = list(dict.fromkeys(k for r in results for k in r["dev_metrics"] if k != metric))
    rows = []
    for e in entries:
        row = {"method": e["method"], "status": "failed" if e["error"] else e["result"]["stopped"],
               "lr": e["config"]["learning_rate"], "own_flags": own_flags.get(e["method"]), "error": e["error"]}
        if r := e["result"]:
            row.update(trainable_params=r["trainable_params"], total_params=r["total_params"],
                       trainable_percent=100 * r["trainable_params"] / max(r["total_params"], 1),
                       adapter_bytes=r["adapter_bytes"],
                       **{f"dev_{k}": r["dev_metrics"].get(k) for k in [metric] + others},
                       epoch_seconds=statistics.mean(r["epoch_seconds"]) if r["epoch_seconds"] else None,
                       train_tokens_per_second=r["train_tokens_per_second"], peak_memory_bytes=r["peak_memory_bytes"],
                       inference_ms_per_example=None if r["inference_seconds_per_example"] is None
                       else 1000 * r["inference_seconds_per_example"])
        rows.append(row)
    columns = [("method", "method", None), ("trainable_params", "trainable params", "{:,}".format),
               ("trainable_percent", "trainable %", human_percent), ("adapter_bytes", "adapter size", human_bytes),
               *[(f"dev_{k}", f"dev {k}", ("{:.2f}" if k == "chrf" else "{:.4f}").format) for k in [metric] + others],
               ("epoch_seconds", "s/epoch", human_number), ("train_tokens_per_second", "train tokens/s", human_number),
               ("peak_memory_bytes", "peak memory", human_bytes),
               ("inference_ms_per_example", "ms/example", human_number),
               ("lr", "lr", "{:g}".format), ("status", "status", None)]
    if any(row["own_flags"] for row in rows):  # --method-args: what each method ran with beyond the shared flags
        columns.append(("own_flags", "own flags", None))
    return rows, columns


def markdown(rows: list[dict], columns: list[tuple]) -> str:
    cells = [[header for _, header, _ in columns]]
    cells += [[(fmt or str)(row[key]) if row.get(key) is not None else "-" for key, _, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    right = [fmt is not None for _, _, fmt in columns]
    def line(items):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(items, widths, right)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(c) for c in cells[1:]])


def plot(path: Path, rows: list[dict], metric: str, task: str) -> bool:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed, so no comparison.png (pip install matplotlib)")
        return False
    points = [r for r in rows if r.get(f"dev_{metric}") is not None]
    if not points:
        return False
    figure = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    markers = "osD^vP*Xh<>"
    for i, r in enumerate(points):  # a legend rather than labels beside the points: labels of close methods collide
        ax.scatter(r["trainable_params"], r[f"dev_{metric}"], s=50, marker=markers[i % len(markers)], label=r["method"])
    ax.legend(fontsize="small", loc="best")
    ax.set(xscale="log", xlabel="trainable parameters (log scale)", ylabel=f"dev {metric}",
           title=f"{task}: dev {metric} against trainable parameters")
    ax.margins(x=0.2, y=0.15)
    ax.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    atomic_save(lambda temp: figure.savefig(temp, format="png", dpi=120), path)
    return True


def write_outputs(out: Path, settings: dict, entries: list[dict], final: bool, in_process: bool = False) -> str:
    metric = settings["metric"]
    rows, columns = table_rows(entries, metric, settings.get("own_flags"))
    fields = list(dict.fromkeys(["method", "status", "trainable_params", "total_params"]
                                + [k for k, _, _ in columns[2:]] + ["own_flags", "error"]))
    with atomic_write(out / "comparison.csv") as handle:
        writer = csv.DictWriter(handle, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(out / "comparison.json") as handle:
        json.dump({"settings": settings, "rows": rows, "runs": entries}, handle, indent=2)
        handle.write("\n")
    wrote = ["comparison.csv", "comparison.json"]
    if final and plot(out / "comparison.png", rows, metric, settings["task"]):
        wrote.append("comparison.png")
    notes = [f"{r['method']} failed: {r['error']}" for r in rows if r["error"]]
    if any(r.get("epoch_seconds") is not None and r["epoch_seconds"] < 30 for r in rows):
        notes.append("timings: one measurement per run, start-up and warm-up included; runs this short mostly measure "
                     "those and the machine's load, so compare speed on full-size runs (or with bench/)")
    if in_process and any(e["result"] and e["result"]["device"] == "cpu" for e in entries):
        notes.append("peak memory on a CPU: the process's peak RSS in each run, memory an earlier run kept included")
    return "\n".join([markdown(rows, columns), *notes, "", f"wrote {', '.join(wrote)} in {out}"])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, configs = parse_command(argv)
    out, first = args.output_dir, next(iter(configs.values()))
    settings = {"task": args.task, "metric": get_task(args.task).metric, "methods": args.methods,
                "argv": list(sys.argv[1:] if argv is None else argv), "own_flags": args.own_flags,
                **{name: getattr(first, name) for name in SHARED}}
    previous = {}
    if (out / "comparison.json").is_file() and any(c.resume for c in configs.values()):
        previous = {e["method"]: e for e in json.loads((out / "comparison.json").read_text())["runs"]}
    entries = []
    try:
        for i, (method, config) in enumerate(configs.items(), 1):
            print(f"\n=== {method} ({i}/{len(configs)}) ===", flush=True)
            if config.resume and reusable(previous.get(method), config):
                print(f"{method}: finished earlier, result reused from {out / 'comparison.json'}")
                entries.append(previous[method])
                continue
            failed_before = previous.get(method, {}).get("error") is not None
            if config.resume and (failed_before or not ckpt.checkpoint_path(config.run_dir).is_file()):
                # Nothing worth continuing (a failed run, or none with a checkpoint yet): start it afresh.
                config = dataclasses.replace(config, resume=False, overwrite=True)
            entries.append((run_one if args.in_process else run_isolated)(method, config))
            write_outputs(out, settings, entries, final=False)  # an interruption keeps what finished
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command with --resume to continue ({out})", file=sys.stderr)
        return 130
    epochs = f"{first.epochs} epoch" + ("s" if first.epochs != 1 else "")
    print(f"\n{args.task}: {len(entries)} methods, {epochs}, seed {first.seed}, model {first.model}, "
          f"{first.max_train_examples or 'all'} training examples\n")
    print(write_outputs(out, settings, entries, final=True, in_process=args.in_process))
    return 1 if any(e["error"] for e in entries) else 0


if __name__ == "__main__":
    sys.exit(main())
