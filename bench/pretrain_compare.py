"""What pretraining buys: the small GPT-2 pretrained here against random weights of the same shape.

    python bench/pretrain_compare.py --tokenizer ../shared/gpt2-tokenizer --data-dir ../shared/data

A smoke run (minutes, the numbers meaningless; outputs in /tmp so bench/pretrain/ keeps real results only):

    python bench/pretrain_compare.py --tokenizer ../shared/gpt2-tokenizer --data-dir ../shared/data \
        --work-dir /tmp/pcb/work --out /tmp/pcb/out --seeds 1 --tasks sst --layers 0 --lengths 8,300 \
        --memorise-steps 4 --pretrain-flags "--steps 2 --batch-size 2 --max-eval-blocks 2 --eval-every-steps 2 \
        --precision fp32" --compare-flags "--epochs 1 --max-train-examples 8 --max-eval-examples 8 --batch-size 4"

1. Pretrains the small model once (`python -m tasks.pretrain`; finished runs are reused, interrupted ones resumed).
2. Runs compare.py on SST, CFIMDB and Quora (the last two on smaller budgets: --task-flags) with
   last-linear-layer, full, LoRA and LoReFT, on the pretrained model and on `random:<preset>`, for each seed.
3. The memorisation test of the ReFT paper, scaled down: a rank-1 LoReFT at the last prompt token (a one-token
   prompt, <|endoftext|>) of one layer learns to make the model continue with a fixed text (the held-out dev
   sonnets, which pretraining never reads); how many of its first L tokens greedy decoding then recovers, for
   each layer and L from 8 up to the context, on both models.

Writes <out>/RESULTS.md (tables, the machine, the times), <out>/results.json (every number) and the plots
<out>/compare.png and <out>/memorisation.png. Runs and memorisation cases go to --work-dir as each ends; rerunning
continues where it stopped (the report sums the times each run and case recorded, so separate invocations, for
instance one per task at --threads 1 side by side, add up), and one there with other settings is refused by name:
after changing a budget, use a new --work-dir.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the project: compare.py, models/, tasks/

import torch  # noqa: E402

import compare  # noqa: E402
from comparison.stats import paired_difference, summarize  # noqa: E402
from bench.common import machine_description  # noqa: E402
from data.atomic import atomic_save, atomic_write  # noqa: E402
from data.readers import default_paths, read_sonnets  # noqa: E402
from models.config import GPT2Config  # noqa: E402
from models.gpt2 import GPT2Model  # noqa: E402
from models.loading import read_config  # noqa: E402
from models.peft import MethodConfig, apply_method  # noqa: E402
from models.tokenizer import GPT2Tokenizer  # noqa: E402
from tasks import pretrain as pretraining  # noqa: E402
from tasks.memorisation import memorise as memorise_text, text_loss  # noqa: E402

METHODS = ("last-linear-layer", "full", "lora", "loreft")
# Budgets that keep the whole bench to about two hours on 2 cores: Quora's training set is large, CFIMDB's reviews
# fill the 256-token context (a CFIMDB epoch costs about twice an SST one at full size).
TASK_FLAGS = {"quora": "--max-train-examples 2000 --max-eval-examples 500",
              "cfimdb": "--max-train-examples 400"}
TASKS = ("sst", "cfimdb", "quora")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tokenizer", default="../shared/gpt2-tokenizer")
    parser.add_argument("--data-dir", default="../shared/data")
    parser.add_argument("--work-dir", default="runs/pretrain-bench", help="the pretraining and compare runs")
    parser.add_argument("--out", default="bench/pretrain", help="where RESULTS.md, results.json and the plots go")
    parser.add_argument("--pretrain-flags", default="--steps 800 --precision fp32",
                        help="flags for python -m tasks.pretrain (its --preset is also the random baseline's shape)")
    parser.add_argument("--seeds", default="11711,11712,11713", help="comma-separated: one compare run each")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--compare-flags", default="--epochs 3 --precision fp32",
                        help="training flags for every compare.py run (fp32, as the pretraining: at n_embd 128 the "
                             "matmuls are too small for bf16 to pay; bench/pretrain_speed.py measures it per shape)")
    parser.add_argument("--task-flags", action="append", default=[], metavar='TASK="FLAGS"',
                        help="extra compare.py flags for one task (repeatable), before --compare-flags, which override "
                             f"them; defaults: {'; '.join(f'{t}={f}' for t, f in TASK_FLAGS.items())}")
    parser.add_argument("--lengths", default="8,16,32,64,128,256",
                        help="memorisation: text lengths in tokens (capped at the context minus the prompt)")
    parser.add_argument("--layers", default=None, help="memorisation: comma-separated layers (default: every layer)")
    parser.add_argument("--memorise-steps", type=int, default=300, help="memorisation: most optimizer steps per case")
    parser.add_argument("--memorise-lr", type=float, default=2e-2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the memorisation cases and every compare run (default: torch's)")
    parser.add_argument("--skip", default="", help="comma-separated phases to skip: compare, memorise")
    args = parser.parse_args(argv)
    args.task_flags_by_task = dict(TASK_FLAGS)
    for entry in args.task_flags:
        task, sep, flags = entry.partition("=")
        if not sep or task not in TASKS:
            parser.error(f'--task-flags {entry!r}: expected TASK="FLAGS" with TASK among {", ".join(TASKS)}')
        args.task_flags_by_task[task] = flags
    return args


# ----------------------------------------------------------------------------------------------- 1. pretraining
def pretrain_once(args, work: Path) -> tuple[Path, dict, str]:
    """The pretrained model's directory, its pretraining log, and the random baseline of the same shape."""
    flags = shlex.split(args.pretrain_flags)
    config = pretraining.parse_args(flags + ["--tokenizer", args.tokenizer, "--data-dir", args.data_dir,
                                             "--output-dir", str(work / "pretrain")])
    log_path = config.run_dir / "log.json"
    log = json.loads(log_path.read_text()) if log_path.is_file() else {}
    if log.get("status") != "finished":
        resume = ckpt_exists(config.run_dir)
        config = pretraining.PretrainConfig(**{**vars(config), "resume": resume, "overwrite": not resume})
        pretraining.pretrain(config)
        log = json.loads(log_path.read_text())
    model_dir = config.run_dir / "best"
    shape, preset = read_config(model_dir / "config.json"), GPT2Config.preset(config.preset)
    if (shape.n_embd, shape.n_layer, shape.n_head, shape.n_positions, shape.vocab_size) != \
            (preset.n_embd, preset.n_layer, preset.n_head, preset.n_positions, preset.vocab_size):
        raise SystemExit(f"{model_dir}: its shape differs from --preset {config.preset}'s, so random:{config.preset} "
                         "would not be the same shape; pretrain without shape flags")
    return model_dir, log, f"random:{config.preset}"


def ckpt_exists(run_dir: Path) -> bool:
    return (run_dir / "last" / "checkpoint.pt").is_file()


# ----------------------------------------------------------------------------------------------- 2. compare
def run_comparisons(args, work: Path, models: dict[str, str]) -> list[dict]:
    rows = []
    for task in args.tasks.split(","):
        for kind, model in models.items():
            for seed in args.seeds.split(","):
                out = work / "compare" / kind / task / f"seed{seed}"
                # The task's flags first, so that a flag of --compare-flags (a smoke run's budget) overrides them.
                flags = shlex.split(args.task_flags_by_task.get(task, "")) + shlex.split(args.compare_flags)
                argv = ["--task", task, "--methods", args.methods, "--model", model, "--tokenizer", args.tokenizer,
                        "--data-dir", args.data_dir, "--output-dir", str(out), "--seed", seed, "--resume", *flags,
                        *(["--threads", str(args.threads)] if args.threads else [])]
                print(f"\n##### {task} / {kind} / seed {seed}: python compare.py {shlex.join(argv)}", flush=True)
                start = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # random weights say so once per run: known here
                    compare.main(argv)
                seconds = time.perf_counter() - start
                for entry in json.loads((out / "comparison.json").read_text())["runs"]:
                    result = entry["result"] or {}
                    rows.append({"task": task, "model": kind, "seed": int(seed), "method": entry["method"],
                                 "metric": result.get("metric"), "dev": result.get("best_dev_metric"),
                                 "trainable_params": result.get("trainable_params"),
                                 "train_seconds": sum(result.get("epoch_seconds") or []), "error": entry["error"],
                                 "compare_seconds": seconds})
    return rows


def dev_metrics(rows: list[dict]) -> dict[tuple, dict[int, float]]:
    """(task, method, model) -> seed -> best dev metric, over the runs that finished."""
    cells: dict[tuple, dict[int, float]] = {}
    for row in rows:
        if row["dev"] is not None:
            cells.setdefault((row["task"], row["method"], row["model"]), {})[row["seed"]] = row["dev"]
    return cells


def summarise(rows: list[dict]) -> list[dict]:
    """Mean, sample standard deviation and 95% t-interval over seeds, per task, method and model
    (comparison/stats.py)."""
    out = []
    for (task, method, kind), by_seed in dev_metrics(rows).items():
        summary = summarize(list(by_seed.values()))
        out.append({"task": task, "method": method, "model": kind, "seeds": summary.n, "mean": summary.mean,
                    "std": summary.std or 0.0, "ci95": interval(summary.low, summary.high)})
    return out


def pretraining_gains(rows: list[dict]) -> list[dict]:
    """Pretrained minus random, paired by seed (the same data order and head initialisation on both models), per
    task and method: the mean gain, its 95% t-interval and the paired t-test's p-value."""
    cells, out = dev_metrics(rows), []
    for (task, method, kind), by_seed in cells.items():
        random_cell = cells.get((task, method, "random"))
        if kind != "pretrained" or not random_cell:
            continue
        gain = paired_difference(by_seed, random_cell)
        out.append({"task": task, "method": method, "seeds": gain.n, "gain": gain.mean,
                    "ci95": interval(gain.low, gain.high), "p": gain.p,
                    "beyond_noise": gain.low is not None and (gain.low > 0 or gain.high < 0)})
    return sorted(out, key=lambda r: (r["task"], r["method"]))


def interval(low, high) -> str:
    return "—" if low is None else f"[{low:.4f}, {high:.4f}]"


# ----------------------------------------------------------------------------------------------- 3. memorisation
def memorisation_text(args, tokenizer: GPT2Tokenizer) -> list[int]:
    """The held-out dev sonnets in full: natural English that pretraining (training files only) never saw."""
    path = default_paths("sonnet", args.data_dir)["dev_true"]
    return tokenizer.encode("\n\n".join(s.text for s in read_sonnets(path)))


def memorise(model_source: str, layer: int, prompt: list[int], target: list[int], steps: int, lr: float,
             seed: int = 0) -> dict:
    """A rank-1 LoReFT at the last prompt token of `layer`, trained until greedy decoding reproduces `target` (or
    `steps` run out): how many leading tokens it recovers at best (tasks/memorisation.py)."""
    torch.manual_seed(seed)  # the same random weights in every case of the random model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gpt = GPT2Model.from_pretrained(model_source)
    gpt.set_dropout(0.0)
    with torch.no_grad():
        base_loss = text_loss(gpt.eval(), prompt, target).item()  # how far from the text the edit starts
    apply_method(gpt, MethodConfig("loreft", rank=1, layers=[layer], positions="l1"))
    outcome = memorise_text(gpt, prompt, target, steps, lr)
    return {"recovered": outcome.recovered, "exact": outcome.exact, "steps": outcome.steps,
            "base_loss": base_loss, "final_loss": outcome.final_loss}


def run_memorisation(args, work: Path, models: dict[str, str], tokenizer: GPT2Tokenizer, n_layer: int,
                     context: int) -> list[dict]:
    """Every (model, layer, length) case; each is kept in <work>/memorise/ as it ends and reused by a rerun with
    the same settings (a case there with other settings is refused, naming its file)."""
    text, prompt = memorisation_text(args, tokenizer), [tokenizer.eos_token_id]
    lengths = sorted({min(int(n), context - len(prompt), len(text)) for n in args.lengths.split(",")})
    layers = [int(i) for i in args.layers.split(",")] if args.layers else list(range(n_layer))
    rows = []
    for kind, model in models.items():
        for layer in layers:
            for length in lengths:
                path = work / "memorise" / f"{kind}-layer{layer}-length{length}.json"
                settings = {"model": model, "steps": args.memorise_steps, "lr": args.memorise_lr,
                            "text": memorisation_text_fingerprint(text[:length])}
                row = json.loads(path.read_text()) if path.is_file() else None
                if row is not None and row.get("settings") != settings:
                    raise SystemExit(f"{path}: measured with other settings ({row.get('settings')}, now {settings}); "
                                     "use a new --work-dir")
                if row is None:
                    start = time.perf_counter()
                    outcome = memorise(model, layer, prompt, text[:length], args.memorise_steps, args.memorise_lr)
                    row = {"model": kind, "layer": layer, "length": length, **outcome,
                           "seconds": time.perf_counter() - start, "settings": settings}
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_write(path) as handle:
                        json.dump(row, handle, indent=2)
                rows.append(row)
                print(f"memorise {kind} layer {layer} length {length}: {row['recovered']}/{length} tokens "
                      f"({row['steps']} steps, {row['seconds']:.0f} s)", flush=True)
    return rows


def memorisation_text_fingerprint(tokens: list[int]) -> str:
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------- report
def plot_compare(path: Path, summary: list[dict]) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in summary))
    if not tasks:
        return
    figure = Figure(figsize=(4.2 * len(tasks), 3.8))
    FigureCanvasAgg(figure)
    for i, task in enumerate(tasks, 1):
        ax = figure.add_subplot(1, len(tasks), i)
        methods = list(dict.fromkeys(r["method"] for r in summary if r["task"] == task))
        for shift, kind in ((-0.2, "pretrained"), (0.2, "random")):
            cells = {r["method"]: r for r in summary if r["task"] == task and r["model"] == kind}
            xs = [j + shift for j, m in enumerate(methods) if m in cells]
            ax.bar(xs, [cells[m]["mean"] for m in methods if m in cells], width=0.4, label=kind,
                   yerr=[cells[m]["std"] for m in methods if m in cells], capsize=3)
        ax.set_xticks(range(len(methods)), methods, rotation=20, fontsize="small")
        ax.set(title=task, ylabel="dev metric (mean over seeds)")
        ax.legend(fontsize="small")
    figure.tight_layout()
    atomic_save(lambda temp: figure.savefig(temp, format="png", dpi=120), path)


def plot_memorisation(path: Path, rows: list[dict]) -> None:
    """Tokens recovered exactly, and how far the trained edit lowered the loss on the text (nats/token): where
    neither model recovers more than a token, the second panel still shows which one the edit could steer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        return
    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    recovered, lowered = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    for kind, style in (("pretrained", "-o"), ("random", "--x")):
        for layer in sorted({r["layer"] for r in rows}):
            cells = sorted((r["length"], r["recovered"], r.get("base_loss"), r["final_loss"]) for r in rows
                           if r["model"] == kind and r["layer"] == layer)
            if not cells:
                continue
            lengths = [c[0] for c in cells]
            recovered.plot(lengths, [c[1] for c in cells], style, label=f"{kind}, layer {layer}")
            if all(c[2] is not None for c in cells):
                lowered.plot(lengths, [c[2] - c[3] for c in cells], style, label=f"{kind}, layer {layer}")
    lengths = sorted({r["length"] for r in rows})
    recovered.plot(lengths, lengths, ":", color="grey", label="the whole text")
    recovered.set(xscale="log", yscale="log", xlabel="text length (tokens)", ylabel="tokens recovered (greedy)",
                  title="rank-1 LoReFT at the last prompt token of one layer")
    lowered.set(xscale="log", xlabel="text length (tokens)", ylabel="loss before - after the edit (nats/token)",
                title="how far the edit moved the model")
    for ax in (recovered, lowered):
        ax.legend(fontsize="x-small")
        ax.grid(True, alpha=0.3)
    figure.tight_layout()
    atomic_save(lambda temp: figure.savefig(temp, format="png", dpi=120), path)


def markdown(rows: list[dict], columns: list[str]) -> str:
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
                     + ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows])


def last_pretraining_record(log: dict) -> dict:
    """The pretraining log's last evaluation: its training seconds and rate (a finished run reused here took
    them in an earlier invocation)."""
    return (log.get("history") or [{}])[-1]


def write_report(out: Path, results: dict) -> None:
    final, trained = results["pretraining"].get("final", {}), last_pretraining_record(results["pretraining"])
    lines = ["# The small pretrained GPT-2 against random weights of the same shape", "",
             f"Command: `python bench/pretrain_compare.py {shlex.join(results['argv'])}`", "",
             f"Machine: {results['machine']['cpu_model']}, {results['machine']['usable_cpus']} usable CPUs, torch "
             f"{results['machine']['torch']}, {results['machine']['date']}.", "",
             "## Pretraining", "",
             f"Held-out perplexity {final.get('best_held_out_ppl', float('nan')):.1f} (step {final.get('best_step')}), "
             f"training perplexity {final.get('train_eval_ppl', float('nan')):.1f} (eval mode); "
             f"{trained.get('train_seconds', float('nan')):.0f} s of training at "
             f"{trained.get('tokens_per_second', float('nan')):,.0f} tokens/s.", ""]
    if results["compare"]:
        metrics = {r["task"]: r["metric"] for r in results["compare"] if r.get("metric")}
        lines += ["## Fine-tuning: dev metric, mean and standard deviation over seeds", "",
                  "Metrics: " + ", ".join(f"{task} {metric}" for task, metric in sorted(metrics.items()))
                  + " (each run's best epoch).", "",
                  markdown(sorted(summarise(results["compare"]), key=lambda r: (r["task"], r["method"], r["model"])),
                           ["task", "method", "model", "seeds", "mean", "std", "ci95"]),
                  "", "## What pretraining buys: pretrained minus random, paired over seeds", "",
                  "The gain's 95% Student-t interval over the per-seed differences and the paired t-test's "
                  "p-value (comparison/stats.py); `beyond_noise` when the interval excludes 0.", "",
                  markdown(pretraining_gains(results["compare"]),
                           ["task", "method", "seeds", "gain", "ci95", "p", "beyond_noise"]),
                  "", f"{sum(r['train_seconds'] for r in results['compare']):,.0f} s of training summed over the "
                  f"runs (evaluation excluded; this invocation: {results['seconds']['compare']:,.0f} s). Failed runs: "
                  f"{sum(1 for r in results['compare'] if r['error']) or 'none'}.", ""]
    if results["memorisation"]:
        longest = {kind: max((r["length"] for r in results["memorisation"] if r["model"] == kind and r["exact"]),
                             default=None) for kind in ("pretrained", "random")}
        lines += ["## Memorisation: tokens recovered exactly (greedy) by a rank-1 LoReFT", "",
                  "Longest text reproduced exactly, over the layers: " + "; ".join(
                      f"{kind} {'none' if n is None else f'{n} tokens'}" for kind, n in longest.items()) + ".", "",
                  "`base_loss`: the frozen model's mean loss (nats/token) on the text before the edit; "
                  "`final_loss`: with the trained edit.", "",
                  markdown(results["memorisation"], ["model", "layer", "length", "recovered", "exact", "steps",
                                                     "base_loss", "final_loss"]),
                  "", f"{sum(r['seconds'] for r in results['memorisation']):,.0f} s summed over the cases (this "
                  f"invocation: {results['seconds']['memorise']:,.0f} s).", ""]
    with atomic_write(out / "RESULTS.md") as handle:
        handle.write("\n".join(lines))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work, out = Path(args.work_dir), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results = {"argv": list(sys.argv[1:] if argv is None else argv), "machine": machine_description(),
               "seconds": {}, "compare": [], "memorisation": []}
    start = time.perf_counter()
    model_dir, results["pretraining"], random_model = pretrain_once(args, work)
    results["seconds"]["pretrain"] = time.perf_counter() - start
    models = {"pretrained": str(model_dir), "random": random_model}
    if "compare" not in skip:
        start = time.perf_counter()
        results["compare"] = run_comparisons(args, work, models)
        results["seconds"]["compare"] = time.perf_counter() - start
        plot_compare(out / "compare.png", summarise(results["compare"]))
    if "memorise" not in skip:
        start = time.perf_counter()
        shape = read_config(model_dir / "config.json")
        tokenizer = GPT2Tokenizer.from_pretrained(model_dir)
        results["memorisation"] = run_memorisation(args, work, models, tokenizer, shape.n_layer, shape.n_positions)
        results["seconds"]["memorise"] = time.perf_counter() - start
        plot_memorisation(out / "memorisation.png", results["memorisation"])
    with atomic_write(out / "results.json") as handle:
        json.dump(results, handle, indent=2, default=str)
    write_report(out, results)
    print(f"\nwrote {out / 'RESULTS.md'}, {out / 'results.json'} and the plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
