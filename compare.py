"""Compare fine-tuning variants on one task with the same data, budget and seeds, in one report.

    python compare.py --task sst --methods full,last-linear-layer,lora,reft,loreft --epochs 3
    python compare.py --task sst --variants lora "lora-r2=lora --rank 2" "loreft-r1=loreft --rank 1 --positions l1" \\
        loreft --seeds 3 --baseline lora --model random:tiny --tokenizer ../shared/gpt2-tokenizer \\
        --data-dir ../shared/data --max-train-examples 300 --max-eval-examples 100 --epochs 2    # a quick run
    python compare.py --task cfimdb --variants-file variants.toml --seeds 5 --baseline lora --budget-steps 500
    python compare.py --task sst --variants "auto2=loreft --layers auto:2" "fixed=loreft --layers 3,9" --seeds 3

A variant is a method with its own flags, named: "NAME=METHOD FLAGS", or a bare method name (the variant is
named after it); --methods a,b is short for --variants a b, and --variants-file reads a JSON or TOML list
(comparison/variants.py shows the format). Every flag of the task's training script (`python train_sentiment.py
--help`) goes to every variant; a method flag (--rank, --positions, ...) only to the variants whose method takes
it, and a part's own flag (--loreft.rank 1, for combinations such as lora+loreft) only to the variants with
that part. --method-args VARIANT="FLAGS" adds flags to one variant. The data, the model, the budget (--epochs, or
--budget-steps / --budget-seconds to stop every run at the same optimizer step or training time) and the seeds
stay shared. --seeds N (or a list) runs every variant once per seed (N seeds from --seed on); --baseline VARIANT
adds each variant's paired difference from it (comparison/stats.py: a paired t-test over seeds).

Each run trains with tasks.trainer.run_training in a fresh process (--in-process: in this one), in
<output-dir>/<variant>/seed-<seed>/, predictions in its predictions/. Written to <output-dir>: comparison.csv,
comparison.json (settings, the table's raw numbers, every run's full result), comparison.md (the report: table,
settings, machine, plots) and the plots comparison.png (dev metric against trainable parameters),
learning_curves.png and metric_vs_seconds.png. A failing run is recorded and the others still run (exit code 1);
the files are rewritten after every run, so an interruption keeps every finished one. --resume reuses finished
runs and continues interrupted ones, and refuses, before anything runs, a command whose settings differ from
the earlier comparison's (naming the setting).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import multiprocessing
import shlex
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from comparison.report import machine, write_outputs
from comparison.variants import Variant, check_unique, method_name, parse_variant, read_variant_file, seed_list
from data.readers import DataFormatError, check_file, default_paths
from models.methods import flag_options, get_method, method_names, parse_combination, registered_methods
from tasks import TASK_NAMES, get_task
from tasks import checkpoint as ckpt
from tasks.cli import SCRIPTS, build_parser, config_from_args, method_config_from_args, option_dest, script_of
from tasks.config import TrainConfig, labelled_directory
from tasks.trainer import TrainingDiverged, run_training

# What every variant shares, or the comparison would not be fair: a variant's own flags may not change these.
SHARED = ("model", "tokenizer", "data_dir", "epochs", "batch_size", "grad_accum", "max_length", "max_train_examples",
          "max_eval_examples", "seed", "device", "precision", "patience", "eval_every", "budget_steps", "budget_seconds")
FINISHED = ("finished", "early stopping", "already finished")
FAILED = ("failed", "diverged")
COMPARISON_FILES = ("comparison.json", "comparison.csv", "comparison.md")


@dataclass
class Run:
    """One variant at one seed."""
    variant: Variant
    seed: int
    config: TrainConfig

    @property
    def key(self) -> str:
        return f"{self.variant.name}/seed-{self.seed}"


# ----------------------------------------------------------------------------------------------- command line
def method_list(text: str) -> list[str]:
    """Methods or combinations (lora+loreft), comma-separated."""
    methods = [m.strip() for m in text.split(",") if m.strip()]
    try:
        methods = [method_name(m) for m in methods]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not methods or len(set(methods)) < len(methods):
        raise argparse.ArgumentTypeError(f"list each method once, comma-separated; got {text!r}")
    return methods


def variant_arg(text: str) -> Variant:
    try:
        return parse_variant(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def own_parser() -> argparse.ArgumentParser:
    own = argparse.ArgumentParser(prog="compare.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                                  epilog="Any other flag is a training flag: see the task's script, " + ", ".join(
                                      f"{' and '.join(tasks)}: python train_{script}.py --help"
                                      for script, tasks in SCRIPTS.items()) + ".")
    own.add_argument("--task", required=True, choices=TASK_NAMES)
    own.add_argument("--methods", type=method_list, default=[],
                     help=f"comma-separated methods, each a variant named after it, among {', '.join(method_names())}, or "
                     "combinations of them (lora+loreft)")
    own.add_argument("--variants", nargs="+", type=variant_arg, default=[], metavar='"NAME=METHOD FLAGS"',
                     help='variants: "lora-r8=lora --rank 8", or a bare method name')
    own.add_argument("--variants-file", type=Path, help="more variants, from a .json or .toml file")
    own.add_argument("--seeds", help="N: every variant runs with the N seeds from --seed on; or a list such as 1,2,3")
    own.add_argument("--baseline", metavar="VARIANT", help="add each variant's paired difference from this one")
    own.add_argument("--output-dir", help="where the runs and the report go (default: runs/compare-<task>)")
    own.add_argument("--in-process", action="store_true",
                     help="train every run in this process (faster start; peak memory then includes what "
                     "earlier runs left behind)")
    own.add_argument("--method-args", action="append", default=[], metavar='VARIANT="FLAGS"',
                     help='training flags for one variant only, e.g. "lora=--lr 5e-4 --rank 16" (repeatable)')
    return own


def parse_command(argv: Optional[Sequence[str]]) -> tuple[argparse.Namespace, list[Run]]:
    """Compare's own flags, and the TrainConfig of every run (all validated, and an earlier comparison checked,
    before anything trains)."""
    own = own_parser()
    args, rest = own.parse_known_args(argv)
    args.output_dir = Path(args.output_dir or f"runs/compare-{args.task}")
    variants = [Variant(m, m) for m in args.methods] + args.variants
    if args.variants_file is not None:
        try:
            variants += read_variant_file(args.variants_file)
        except ValueError as error:
            own.error(f"--variants-file {error}")
    if not variants:
        own.error("name what to compare: --methods, --variants or --variants-file")
    try:
        check_unique(variants)
    except ValueError as error:
        own.error(str(error))
    extra = {v.name: list(v.flags) for v in variants}
    for item in args.method_args:
        name, _, flags = item.partition("=")
        if name.strip() not in extra:
            own.error(f"--method-args {item!r}: give VARIANT=FLAGS for one of the variants ({','.join(extra)})")
        extra[name.strip()] += shlex.split(flags)
    variants = [dataclasses.replace(v, flags=tuple(extra[v.name])) for v in variants]  # --method-args included
    if args.baseline is not None and args.baseline not in extra:
        own.error(f"--baseline {args.baseline!r} is none of the variants ({','.join(extra)})")

    # The task script's parser, with no default for the flags compare sets itself (so that giving them is caught).
    parser = build_parser(script_of(args.task), default_task=args.task)
    parser.set_defaults(method=None, predictions_dir=None)
    parser.error = own.error  # a bad training flag is reported with compare.py's usage, not the script's

    def parse_run_flags(tokens: list[str]) -> argparse.Namespace:
        ns = parser.parse_args(tokens)
        for flag in ("method", "output_dir", "predictions_dir"):
            if getattr(ns, flag) is not None:
                own.error(f"--{flag.replace('_', '-')} is set by compare.py: use --variants and --output-dir (each "
                          "run goes to <output-dir>/<variant>/seed-<seed>)")
        return ns

    shared = parse_run_flags(rest)
    takes = {v.name: {name for method, _ in parse_combination(v.method) for name in get_method(method).options}
             for v in variants}
    parts = {v.name: {name or method for method, name in parse_combination(v.method)} for v in variants}
    unused = [option.flag for option in flag_options() if getattr(shared, option_dest(option)) is not None
              and not any(option.name in takes[v.name] for v in variants)]
    unused += [typed for part, _, _, typed in shared.part_flags if not any(part in parts[v.name] for v in variants)]
    if unused:
        own.error(f"{', '.join(unused)} applies to none of the methods {','.join(dict.fromkeys(v.method for v in variants))}")
    configs = {}
    for v in variants:
        ns, own_flags = parse_run_flags(rest + extra[v.name]), parse_run_flags(extra[v.name])
        for option in flag_options():
            if getattr(own_flags, option_dest(option)) is None and option.name not in takes[v.name]:
                setattr(ns, option_dest(option), None)  # a shared flag meant for the other variants
        # A shared --PART.FLAG goes to the variants that have that part (--loreft.rank: loreft, lora+loreft, ...).
        ns.part_flags = [flag for flag in ns.part_flags if flag in own_flags.part_flags or flag[0] in parts[v.name]]
        ns.method, ns.output_dir, ns.predictions_dir = v.method, str(labelled_directory(args.output_dir, v.name)), "predictions"
        try:
            method_config_from_args(ns)
        except ValueError as error:
            own.error(f"{v.name}: {error}")
        configs[v.name] = config_from_args(ns, parser)
    for name in SHARED:
        values = {v: getattr(c, name) for v, c in configs.items()}
        if len(set(map(str, values.values()))) > 1:
            own.error(f"every variant must share {name}, but their own flags give {values}")
    first = next(iter(configs.values()))
    try:
        args.seeds = seed_list(args.seeds, first.seed) if args.seeds is not None else [first.seed]
    except ValueError as error:
        own.error(f"argument --seeds: {error}")
    runs = []
    for v in variants:
        for seed in args.seeds:
            run_dir = labelled_directory(args.output_dir, v.name) / f"seed-{seed}"
            runs.append(Run(v, seed, dataclasses.replace(configs[v.name], seed=seed, output_dir=str(run_dir),
                                                          predictions_dir=str(run_dir / "predictions"))))
    if first.resume:
        problem = resume_conflict(args.output_dir, runs)
        if problem:
            own.error(problem)
    elif not first.overwrite:
        taken = [str(r.config.run_dir) for r in runs if any((r.config.run_dir / n).exists() for n in ckpt.RUN_FILES)]
        taken += [str(args.output_dir / n) for n in COMPARISON_FILES if (args.output_dir / n).exists()][:1]
        if taken:
            own.error(f"{', '.join(taken)}: an earlier comparison is there: pass --resume (finished runs are reused, "
                      "interrupted ones continued), --overwrite, or another --output-dir")
    for split in ("train", "dev"):  # shared by every run: one clear error now rather than one per run later
        try:
            check_file(default_paths(first.task, first.data_dir)[split])
        except DataFormatError as error:
            own.error(str(error))
    args.variant_list = variants
    args.own_flags = {name: shlex.join(flags) for name, flags in extra.items() if flags}
    return args, runs


# ----------------------------------------------------------------------------------------------- resuming
def comparable(config) -> dict:
    """The config as JSON, without the flags that only say how to start it."""
    out = json.loads(json.dumps(config.to_dict() if isinstance(config, TrainConfig) else config))
    out.pop("resume", None), out.pop("overwrite", None)
    return out


def differences(old: Any, new: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted name, old, new) of every setting that differs between two configs as JSON."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [found for key in sorted(set(old) | set(new))
                for found in differences(old.get(key), new.get(key), f"{path}.{key}" if path else key)]
    return [] if old == new else [(path, old, new)]


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def previous_entries(out: Path) -> dict:
    saved = read_json(out / "comparison.json") or {}
    return {f"{e['variant']}/seed-{e['seed']}": e for e in saved.get("runs", []) if "variant" in e}


def resume_conflict(out: Path, runs: list[Run]) -> Optional[str]:
    """Why --resume cannot continue the comparison in `out` with these runs (None when it can): a run of the
    earlier comparison that this command leaves out, or a finished or interrupted run whose settings changed.
    A failed run has nothing to keep: it may change, and runs again."""
    fix = "give the earlier settings to continue it, or another --output-dir (or --overwrite to replace it)"
    previous = previous_entries(out)
    keys = {r.key for r in runs}
    left_out = [key for key in previous if key not in keys]
    if left_out:
        return f"--resume: the comparison in {out} also has {', '.join(left_out)}, which this command leaves out; {fix}"
    for run in runs:
        entry, log = previous.get(run.key), read_json(run.config.run_dir / "log.json")
        if (entry and entry.get("error")) or (log and log.get("status") in FAILED):
            continue
        earlier = log["config"] if log else (entry["config"] if entry else None)
        if earlier is None:
            continue
        changed = differences(comparable(earlier), comparable(run.config))
        if changed:
            details = "; ".join(f"{name}: it ran with {json.dumps(old)}, this command gives {json.dumps(new)}"
                                for name, old, new in changed)
            return f"--resume: settings changed for {run.key} since the comparison in {out} ({details}); {fix}"
    return None


# ----------------------------------------------------------------------------------------------- running
def run_one(run: Run) -> dict:
    entry = {"variant": run.variant.name, "method": run.variant.method, "seed": run.seed,
             "config": comparable(run.config), "result": None, "error": None}
    try:
        entry["result"] = run_training(run.config.task, run.config).to_dict()
    except Exception as error:  # one run's failure must not cost the others' results
        if not isinstance(error, (TrainingDiverged, ValueError, OSError)):
            traceback.print_exc()
        entry["error"] = f"{type(error).__name__}: {error}"
        print(f"{run.key} failed: {entry['error']}", file=sys.stderr)
    return entry


def run_isolated(run: Run) -> dict:
    """run_one in a fresh process, so that each run's peak memory is its own (on a CPU the peak RSS of a
    process only grows: memory an earlier run used stays counted)."""
    context = multiprocessing.get_context("spawn")  # a clean interpreter: no forked torch threads or state
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(run, send, plugin_modules()), name=f"compare-{run.variant.name}")
    child.start()
    send.close()  # the child holds the only writing end: its exit ends recv() with EOFError
    try:
        return receive.recv()
    except EOFError:
        child.join()
        error = f"the training process exited with code {child.exitcode} before reporting a result"
        print(f"{run.key} failed: {error}", file=sys.stderr)
        return {"variant": run.variant.name, "method": run.variant.method, "seed": run.seed,
                "config": comparable(run.config), "result": None, "error": error}
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


def _child(run: Run, send, modules: list[str]) -> None:
    try:
        for module in modules:
            importlib.import_module(module)
        send.send(run_one(run))
    except KeyboardInterrupt:
        pass  # the parent reports the interruption once
    finally:
        send.close()


def reusable(entry: Optional[dict], config) -> bool:
    """An earlier comparison's result for this very run, which has finished."""
    log = read_json(config.run_dir / "log.json") or {}
    return bool(entry and entry["error"] is None and entry["config"] == comparable(config)
                and log.get("status") in FINISHED)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, runs = parse_command(argv)
    out, first = args.output_dir, runs[0].config
    settings = {"task": args.task, "metric": get_task(args.task).metric,
                "variants": [v.to_dict() for v in args.variant_list], "seeds": args.seeds, "baseline": args.baseline,
                "budget": first.budget, "argv": list(sys.argv[1:] if argv is None else argv),
                "own_flags": args.own_flags, "machine": machine(),
                **{name: getattr(first, name) for name in SHARED if name != "seed"}}
    # Earlier results stay in the table until their run is redone, so an interruption loses none of them.
    entries = {key: e for key, e in previous_entries(out).items()} if first.resume else {}
    order = {r.key: i for i, r in enumerate(runs)}

    def ordered() -> list[dict]:
        return sorted(entries.values(), key=lambda e: order[f"{e['variant']}/seed-{e['seed']}"])

    try:
        for i, run in enumerate(runs, 1):
            print(f"\n=== {run.key} ({i}/{len(runs)}) ===", flush=True)
            config, entry = run.config, entries.get(run.key)
            if config.resume and reusable(entry, config):
                print(f"{run.key}: finished earlier, result reused from {out / 'comparison.json'}")
                continue
            if config.resume and ((entry or {}).get("error") is not None
                                  or not ckpt.checkpoint_path(config.run_dir).is_file()):
                # Nothing worth continuing (a failed run, or none with a checkpoint yet): start it afresh.
                run = dataclasses.replace(run, config=dataclasses.replace(config, resume=False, overwrite=True))
            entries[run.key] = run_one(run) if args.in_process else run_isolated(run)
            write_outputs(out, settings, ordered())  # an interruption keeps what finished
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command with --resume to continue ({out})", file=sys.stderr)
        return 130
    print(f"\n{args.task}: {len(args.variant_list)} variants x {len(args.seeds)} seed(s), budget {first.budget}, "
          f"model {first.model}, {first.max_train_examples or 'all'} training examples\n")
    print(write_outputs(out, settings, ordered(), in_process=args.in_process))
    return 1 if any(e["error"] for e in entries.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
