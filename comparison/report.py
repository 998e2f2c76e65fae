"""The comparison's outputs: one row per variant (statistics over its seeds), written as comparison.csv / .json /
.md, and three plots. A variant keeps its colour and marker in every plot and every comparison: both derive
from a hash of its name, and only a clash with another variant of the same comparison moves it (styles)."""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
from pathlib import Path
from typing import Callable, Optional

from comparison.stats import median, paired_difference, summarize
from data.atomic import atomic_save, atomic_write

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")  # matplotlib's tab10
MARKERS = "osD^vP*Xh<>p"
PLOTS = {"comparison.png": "dev metric against trainable parameters",
         "learning_curves.png": "dev metric per epoch",
         "metric_vs_seconds.png": "dev metric against training time"}


def style(name: str) -> tuple[str, str]:
    """(colour, marker) of a variant, the same wherever its name appears."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return PALETTE[h % len(PALETTE)], MARKERS[(h // len(PALETTE)) % len(MARKERS)]


def styles(names) -> dict[str, tuple[str, str]]:
    """style() of each name, except that within one comparison no two variants share a colour while the palette
    lasts, nor a (colour, marker) pair while there are pairs: a clashing name moves to the next free colour (once
    the colours are all taken, to the next free pair: its colour's other markers first), names taken in sorted
    order, so the same set of variants always gets the same styles."""
    out = {}
    for name in sorted(set(names)):
        colour, marker = style(name)
        first_colour, first_marker = PALETTE.index(colour), MARKERS.index(marker)
        candidates = [(PALETTE[(first_colour + i) % len(PALETTE)], MARKERS[(first_marker + j) % len(MARKERS)])
                      for i in range(len(PALETTE)) for j in range(len(MARKERS))]
        used_colours, used_pairs = {c for c, _ in out.values()}, set(out.values())
        free = (lambda pair: pair[0] not in used_colours) if len(used_colours) < len(PALETTE) else \
            (lambda pair: pair not in used_pairs)
        out[name] = next(filter(free, candidates), (colour, marker))
    return out


# ----------------------------------------------------------------------------------------------- formatting
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


def metric_format(metric: str) -> str:
    return "{:.2f}" if metric == "chrf" else "{:.4f}"


def human_p(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


# ----------------------------------------------------------------------------------------------- rows
def metric_names(entries: list[dict], metric: str) -> list[str]:
    others = dict.fromkeys(k for e in entries if e["result"] for k in e["result"]["dev_metrics"] if k != metric)
    return [metric, *others]


def seed_values(runs: list[dict], metric: str) -> dict:
    return {e["seed"]: e["result"]["dev_metrics"][metric] for e in runs
            if e["result"] and e["result"]["dev_metrics"].get(metric) is not None}


def training_seconds(result: dict) -> float:
    return sum(result["epoch_seconds"])


def variant_rows(entries: list[dict], settings: dict) -> list[dict]:
    """One row of raw numbers per variant: per metric mean, std, 95% CI (and the paired difference from the
    baseline); timings and memory as medians over the seeds."""
    metrics = metric_names(entries, settings["metric"])
    baseline = settings.get("baseline")
    base_runs = [e for e in entries if e["variant"] == baseline]
    rows = []
    for variant in settings["variants"]:
        runs = [e for e in entries if e["variant"] == variant["name"]]
        done = [e["result"] for e in runs if e["result"]]
        statuses = list(dict.fromkeys(e["result"]["stopped"] if e["result"] else "failed" for e in runs))
        row = {"variant": variant["name"], "method": variant["method"], "flags": " ".join(variant["flags"]) or None,
               "seeds": len(done), "runs": len(runs), "status": ", ".join(statuses) or "not run",
               "budget": settings["budget"], "lr": runs[0]["config"]["learning_rate"] if runs else None,
               "error": next((e["error"] for e in runs if e["error"]), None)}
        if done:
            first = done[0]
            row.update(trainable_params=first["trainable_params"], total_params=first["total_params"],
                       trainable_percent=100 * first["trainable_params"] / max(first["total_params"], 1),
                       adapter_bytes=median([r["adapter_bytes"] for r in done]))
        for m in metrics:
            values = seed_values(runs, m)
            if values:
                s = summarize(list(values.values()))
                row.update({f"dev_{m}_mean": s.mean, f"dev_{m}_std": s.std, f"dev_{m}_ci_low": s.low,
                            f"dev_{m}_ci_high": s.high})
            if baseline and variant["name"] != baseline:
                d = paired_difference(values, seed_values(base_runs, m)) if values else None
                if d is not None:
                    row.update({f"dev_{m}_diff": d.mean, f"dev_{m}_diff_low": d.low, f"dev_{m}_diff_high": d.high,
                                f"dev_{m}_p": d.p, f"dev_{m}_pairs": d.n})
        row.update(
            steps=median([r["epochs"][-1]["step"] for r in done if r["epochs"]]),
            train_seconds=median([training_seconds(r) for r in done]),
            epoch_seconds=median([statistics.mean(r["epoch_seconds"]) for r in done if r["epoch_seconds"]]),
            train_tokens_per_second=median([r["train_tokens_per_second"] for r in done]),
            peak_memory_bytes=median([r["peak_memory_bytes"] for r in done]),
            inference_ms_per_example=median([1000 * r["inference_seconds_per_example"] for r in done
                                             if r["inference_seconds_per_example"] is not None]))
        rows.append(row)
    return rows


def csv_fields(metrics: list[str], baseline: Optional[str]) -> list[str]:
    per_metric = [f"dev_{m}_{part}" for m in metrics for part in
                  ("mean", "std", "ci_low", "ci_high") + (("diff", "diff_low", "diff_high", "p", "pairs") if baseline else ())]
    return ["variant", "method", "flags", "seeds", "runs", "status", "budget", "trainable_params", "total_params",
            "trainable_percent", "adapter_bytes", *per_metric, "steps", "train_seconds", "epoch_seconds",
            "train_tokens_per_second", "peak_memory_bytes", "inference_ms_per_example", "lr", "error"]


# ----------------------------------------------------------------------------------------------- the table
def columns(metrics: list[str], baseline: Optional[str]) -> list[tuple[str, Callable[[dict], Optional[str]], bool]]:
    """(header, cell text of a row or None, right-aligned) of the printed table."""
    def number(key, fmt):
        return lambda row: None if row.get(key) is None else fmt(row[key])

    def mean_std(m):
        fmt = metric_format(m).format
        def cell(row):
            if row.get(f"dev_{m}_mean") is None:
                return None
            std = row.get(f"dev_{m}_std")
            return fmt(row[f"dev_{m}_mean"]) + ("" if std is None else f" ± {fmt(std)}")
        return cell

    def interval(m, low, high, signed=False):
        fmt = (metric_format(m).replace("{:", "{:+") if signed else metric_format(m)).format
        return lambda row: None if row.get(low) is None else f"[{fmt(row[low])}, {fmt(row[high])}]"

    def difference(m):
        fmt = metric_format(m).replace("{:", "{:+").format
        def cell(row):
            if row["variant"] == baseline:
                return "baseline"
            if row.get(f"dev_{m}_diff") is None:
                return None
            low = row.get(f"dev_{m}_diff_low")
            return fmt(row[f"dev_{m}_diff"]) + ("" if low is None else f" [{fmt(low)}, {fmt(row[f'dev_{m}_diff_high'])}]")
        return cell

    out = [("variant", lambda row: row["variant"], False), ("seeds", lambda row: f"{row['seeds']}/{row['runs']}", True),
           ("trainable params", number("trainable_params", "{:,}".format), True),
           ("trainable %", number("trainable_percent", human_percent), True),
           ("adapter size", number("adapter_bytes", human_bytes), True)]
    for m in metrics:
        out += [(f"dev {m} (mean ± std)", mean_std(m), True),
                (f"{m} 95% CI", interval(m, f"dev_{m}_ci_low", f"dev_{m}_ci_high"), True)]
        if baseline:
            out += [(f"Δ {m} vs {baseline} [95% CI]", difference(m), True),
                    (f"{m} p", number(f"dev_{m}_p", human_p), True)]
    out += [("steps", number("steps", "{:,.0f}".format), True), ("train s", number("train_seconds", human_number), True),
            ("train tokens/s", number("train_tokens_per_second", human_number), True),
            ("peak memory", number("peak_memory_bytes", human_bytes), True),
            ("ms/example", number("inference_ms_per_example", human_number), True),
            ("lr", number("lr", "{:g}".format), True), ("status", lambda row: row["status"], False),
            ("runs as", lambda row: " ".join(filter(None, [row["method"], row["flags"]])), False)]
    return out


def markdown(rows: list[dict], cols: list[tuple]) -> str:
    cells = [[header for header, _, _ in cols]] + [[cell(row) or "-" for _, cell, _ in cols] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    right = [r for _, _, r in cols]

    def line(items):
        return "| " + " | ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(items, widths, right)) + " |"
    rule = "|" + "|".join("-" * (w + 1) + ":" if r else "-" * (w + 2) for w, r in zip(widths, right)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(c) for c in cells[1:]])


# ----------------------------------------------------------------------------------------------- plots
def figure_and_axes():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.2, 4.6))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def title(settings: dict, what: str) -> str:
    return f"{settings['task']} · {settings['model']} · budget {settings['budget']}\n{what}"


def save(figure, ax, path: Path) -> None:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="best")
    figure.tight_layout()
    atomic_save(lambda temp: figure.savefig(temp, format="png", dpi=120), path)


def metric_range(metric: str) -> tuple[float, float]:
    """The values a metric can take: chrF is 0-100, accuracy and F1 are 0-1."""
    return (0.0, 100.0) if metric == "chrf" else (0.0, 1.0)


def error_bars(row: dict, key: str, bounds: tuple[float, float]) -> Optional[list]:
    """The 95% interval as error bars, clipped to the metric's range (with few seeds a t-interval can reach past
    it; the table keeps the unclipped numbers)."""
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    if low is None:
        return None
    mean = row[f"{key}_mean"]
    return [[mean - max(low, bounds[0])], [min(high, bounds[1]) - mean]]


def plot_against(path: Path, rows: list[dict], settings: dict, x_key: str, xlabel: str, what: str,
                 log_x: bool = False, x_range: Optional[Callable[[dict], list]] = None) -> bool:
    metric = settings["metric"]
    key = f"dev_{metric}"
    points = [r for r in rows if r.get(f"{key}_mean") is not None and r.get(x_key) is not None]
    if not points:
        return False
    figure, ax = figure_and_axes()
    looks = styles([v["name"] for v in settings["variants"]] + [r["variant"] for r in points])
    for r in points:
        colour, marker = looks[r["variant"]]
        ax.errorbar(r[x_key], r[f"{key}_mean"], yerr=error_bars(r, key, metric_range(metric)), xerr=x_range(r) if x_range else None,
                    fmt=marker, color=colour, markersize=8, capsize=4, label=r["variant"])
    seeds = max(r["seeds"] for r in points)
    bars = "bars: 95% t-interval over seeds (clipped to the metric's range)" if seeds > 1 else "one seed: no bars"
    ax.set(xlabel=xlabel, ylabel=f"dev {metric} (mean over seeds)", title=title(settings, f"{what}\n{bars}"))
    if log_x:
        ax.set_xscale("log")
    ax.title.set_size("medium")
    ax.margins(x=0.15, y=0.15)
    save(figure, ax, path)
    return True


def plot_learning_curves(path: Path, entries: list[dict], settings: dict) -> bool:
    metric = settings["metric"]
    figure, ax = figure_and_axes()
    drawn, count = False, len(settings["variants"])
    looks = styles(v["name"] for v in settings["variants"])
    for index, variant in enumerate(settings["variants"]):
        by_epoch: dict[int, list[float]] = {}
        for e in entries:
            if e["variant"] == variant["name"] and e["result"]:
                for epoch in e["result"]["epochs"]:
                    if epoch.get("dev", {}).get(metric) is not None:
                        by_epoch.setdefault(epoch["epoch"], []).append(epoch["dev"][metric])
        if not by_epoch:
            continue
        epochs = sorted(by_epoch)
        means = [statistics.fmean(by_epoch[k]) for k in epochs]
        stds = [statistics.stdev(by_epoch[k]) if len(by_epoch[k]) > 1 else 0.0 for k in epochs]
        colour, marker = looks[variant["name"]]
        dodge = 0.12 * (index - (count - 1) / 2) / max(count - 1, 1)  # keeps the bars of one epoch apart
        ax.errorbar([k + dodge for k in epochs], means, yerr=stds, fmt="-" + marker, color=colour, markersize=6, capsize=3,
                    label=variant["name"])
        drawn = True
    if not drawn:
        return False
    ax.set(xlabel="epoch" + (" (the last may be partial under a step or time budget)"
                             if "epoch" not in settings["budget"] else ""),
           ylabel=f"dev {metric} (mean over seeds)", title=title(settings, f"dev {metric} per epoch\nbars: ± 1 std over seeds"))
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.title.set_size("medium")
    save(figure, ax, path)
    return True


def write_plots(out: Path, rows: list[dict], entries: list[dict], settings: dict) -> list[str]:
    """The plots that could be drawn (none without matplotlib); a plot that cannot be drawn any more is removed,
    so that none is left from an earlier comparison."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    metric = settings["metric"]

    def seconds_range(row):
        low, high = row["train_seconds_range"]
        return [[row["train_seconds"] - low], [high - row["train_seconds"]]]

    for row in rows:
        seconds = [training_seconds(e["result"]) for e in entries if e["variant"] == row["variant"] and e["result"]]
        row["train_seconds_range"] = (min(seconds), max(seconds)) if seconds else None
    drawn = {
        "comparison.png": plot_against(out / "comparison.png", rows, settings, "trainable_params",
                                       "trainable parameters (log scale)", f"dev {metric} against trainable parameters",
                                       log_x=True),
        "learning_curves.png": plot_learning_curves(out / "learning_curves.png", entries, settings),
        "metric_vs_seconds.png": plot_against(out / "metric_vs_seconds.png", rows, settings, "train_seconds",
                                              "training seconds (median; bars: min to max over seeds)",
                                              f"dev {metric} against training time", x_range=seconds_range),
    }
    for row in rows:
        del row["train_seconds_range"]
    for name, ok in drawn.items():
        if not ok and (out / name).exists():
            (out / name).unlink()
    return [name for name, ok in drawn.items() if ok]


# ----------------------------------------------------------------------------------------------- the files
def machine() -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpus": os.cpu_count(), "processor": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


STATISTICS_NOTE = (
    "Per metric: the mean over seeds ± the sample standard deviation, and the 95% Student-t interval of the mean "
    "(mean ± t(0.975, n-1)·std/√n). Δ: the mean per-seed difference from the baseline (runs paired by seed, "
    "so the same data order and dev examples), its 95% t-interval and the two-sided p-value of a paired t-test "
    "over seeds (comparison/stats.py says why a t-test over seeds rather than a bootstrap over dev examples). "
    "Timings and memory: medians over seeds.")


def report_markdown(settings: dict, table: str, notes: list[str], plots: list[str]) -> str:
    shown = ["task", "model", "tokenizer", "data_dir", "max_train_examples", "max_eval_examples", "budget", "epochs",
             "batch_size", "grad_accum", "max_length", "seeds", "baseline", "precision", "device", "patience"]
    lines = [f"# Comparison: {settings['task']}, {settings['model']}, budget {settings['budget']}", "",
             "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {settings.get(name) if settings.get(name) is not None else '-'} |" for name in shown]
    lines += ["", "Variants (each with the shared settings above and its own flags):", ""]
    lines += [f"- `{v['name']}`: `{' '.join([v['method'], *v['flags']])}`" for v in settings["variants"]]
    lines += ["", f"Command: `python compare.py {shlex.join(settings['argv'])}`", "", "## Machine", ""]
    lines += [f"- {key}: {value}" for key, value in settings["machine"].items()]
    lines += ["", "## Results", "", table, "", STATISTICS_NOTE, ""]
    lines += [f"- {note}" for note in notes]
    if plots:
        lines += ["", "## Plots", ""]
        lines += [f"![{PLOTS[name]}]({name})\n" for name in plots]
    return "\n".join(lines).rstrip() + "\n"


def write_outputs(out: Path, settings: dict, entries: list[dict], in_process: bool = False) -> str:
    """Writes comparison.csv / .json / .md and the plots; returns the table and notes to print."""
    metrics = metric_names(entries, settings["metric"])
    rows = variant_rows(entries, settings)
    with atomic_write(out / "comparison.csv") as handle:
        writer = csv.DictWriter(handle, csv_fields(metrics, settings.get("baseline")), lineterminator="\n",
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_write(out / "comparison.json") as handle:
        json.dump({"settings": settings, "rows": rows, "runs": entries}, handle, indent=2)
        handle.write("\n")
    plots = write_plots(out, rows, entries, settings)
    table = markdown(rows, columns(metrics, settings.get("baseline")))
    notes = [f"{r['variant']} failed: {r['error']}" for r in rows if r["error"]]
    if settings.get("baseline") and len(settings["seeds"]) < 2:
        notes.append("one seed: no intervals and no p-values (--seeds 3 or more gives them)")
    if any(r.get("epoch_seconds") is not None and r["epoch_seconds"] < 30 for r in rows):
        notes.append("timings: start-up and warm-up included; runs this short mostly measure those and the machine's "
                     "load, so compare speed on full-size runs (or with bench/)")
    if in_process and any(e["result"] and e["result"]["device"] == "cpu" for e in entries):
        notes.append("peak memory on a CPU: the process's peak RSS in each run, memory an earlier run kept included")
    with atomic_write(out / "comparison.md") as handle:
        handle.write(report_markdown(settings, table, notes, plots))
    wrote = ["comparison.csv", "comparison.json", "comparison.md", *plots]
    return "\n".join([f"budget: {settings['budget']}; seeds: {', '.join(map(str, settings['seeds']))}", table, *notes,
                      "", f"wrote {', '.join(wrote)} in {out}"])
