"""Turns the raw figures of bench/run.py into ratios, MFU, target checks and the bounds that explain a miss,
and writes bench/results.json and bench/RESULTS.md."""
from __future__ import annotations

import json
from pathlib import Path

import common
from data.atomic import atomic_write

# name -> (what it is, target, "min" when the figure must reach the target, "max" when it must stay under)
TARGETS = {
    "forward_vs_transformers": ("forward tokens/s, each side at its best precision", 2.0, "min"),
    "lora_step_vs_peft": ("LoRA r=8 training step tokens/s vs peft", 3.0, "min"),
    "loreft_step_vs_pyreft": ("LoReFT r=4 training step tokens/s vs pyreft", 3.0, "min"),
    "generate_vs_transformers": ("new tokens/s vs transformers generate (worse of batch 1 and 8)", 1.5, "min"),
    "forward_mfu": ("forward FLOP/s / the matmul peak of the machine's precision", 0.5, "min"),
    "sst_epoch_seconds_loreft": ("one SST epoch with LoReFT, seconds", 60.0, "max"),
    "sst_later_epoch_seconds_last-linear-layer": ("slowest SST epoch after the first, last-linear-layer, seconds",
                                                  5.0, "max"),
    "sst_later_epoch_fraction_loreft-top4": ("slowest SST epoch after the first / the first, LoReFT on the top four "
                                             "layers", 0.25, "max"),
    "sst_run_over_first_epoch_loreft": ("3-epoch SST run / its first epoch, last-position LoReFT", 2.0, "max"),
}
# SST-5 training set as the GPT-2 tokenizer splits it: sentences, tokens, and the forward FLOPs of one pass
# over them (sum over sentences of forward_flops at their own length), for the epoch-time bound.
SST_TRAIN = {"sentences": 8544, "tokens": 192463, "forward_flops": 32.89e12}
BUSY_CORES = 0.25  # other processes' mean load above which a run is flagged as disturbed
GPT2 = {"n_layer": 12, "d": 768, "vocab": 50257, "params_matmul": 12 * 12 * 768 * 768}


def rate(results: dict, figure: str, side: str):
    entry = results["figures"].get(figure, {}).get(side, {})
    return entry.get("units_per_s_median")


def best_rate(results: dict, figures: list[str], side: str):
    rates = [(rate(results, f, side), f) for f in figures]
    rates = [(r, f) for r, f in rates if r is not None]
    return max(rates) if rates else (None, None)


def ratio(ours, peer):
    return ours / peer if ours is not None and peer else None


def forward_flops_per_token(length: int) -> float:
    return common.forward_flops(GPT2["n_layer"], GPT2["d"], 1, length) / length


def step_flops_per_token(method: str, side: str = "peer") -> float:
    """FLOPs per token of one training step as each side computes it. Our ReFT-family methods at the last
    position run the earlier tokens without gradients (GPT2Model.forward_trainable_suffix): one forward pass,
    plus the backward of one token of the T, instead of 2x the forward (the rank-4 edits' own FLOPs are left out
    on both sides: under 0.1%)."""
    length = common.STEP_SHAPE[1]
    forward = common.forward_flops(GPT2["n_layer"], GPT2["d"], 1, length) / length
    if method in common.REFT_INTERVENTIONS and side == "ours":
        return forward * (1 + 1 / length)
    return common.train_step_flops(GPT2["n_layer"], GPT2["d"], 1, length, weight_grads=method == "full") / length


def step_methods(results: dict) -> list[str]:
    """The training-step cases measured: step_<method> figures."""
    return [name[len("step_"):] for name in results["figures"] if name.startswith("step_")]


def derive(results: dict) -> None:
    """Fills results['ratios'], ['mfu'], ['targets'] and ['bounds'] from the figures measured so far."""
    ratios, mfu, bounds = {}, {}, {}
    ours_fwd, ours_fwd_name = best_rate(results, ["forward_bf16", "forward_fp32"], "ours")
    ratios["forward_vs_transformers"] = ratio(ours_fwd, best_rate(results, ["forward_bf16", "forward_fp32"], "peer")[0])
    ratios["forward_fp32_vs_transformers"] = ratio(rate(results, "forward_fp32", "ours"),
                                                   rate(results, "forward_fp32", "peer"))
    ratios["full_step_vs_transformers"] = ratio(rate(results, "step_full", "ours"), rate(results, "step_full", "peer"))
    ratios["lora_step_vs_peft"] = ratio(rate(results, "step_lora", "ours"), rate(results, "step_lora", "peer"))
    for method in common.REFT_INTERVENTIONS:
        ratios[f"{method}_step_vs_pyreft"] = ratio(rate(results, f"step_{method}", "ours"),
                                                   rate(results, f"step_{method}", "peer"))
    for method in ("lora_c_attn", "dora", "ia3", "prompt", "ptuning", "prefix"):
        ratios[f"{method}_step_vs_peft"] = ratio(rate(results, f"step_{method}", "ours"),
                                                 rate(results, f"step_{method}", "peer"))
    per_batch = []
    for batch in (1, 8):
        names = [f"generate_b{batch}_bf16", f"generate_b{batch}_fp32"]
        value = ratio(best_rate(results, names, "ours")[0], best_rate(results, names, "peer")[0])
        ratios[f"generate_vs_transformers_b{batch}"] = value
        per_batch.append(value)
    ratios["generate_vs_transformers"] = min(per_batch) if None not in per_batch else None

    precision = best_precision(results)
    peak = results.get("matmul_peak", {}).get(precision, {}).get("flops_per_s")
    length = common.FORWARD_SHAPE[1]
    fwd_flops = forward_flops_per_token(length)
    if peak:
        mfu["forward_mfu"] = ours_fwd * fwd_flops / peak if ours_fwd else None
        mfu[f"forward_mfu_transformers_{precision}"] = \
            (rate(results, f"forward_{precision}", "peer") or 0) * fwd_flops / peak or None
        for method in step_methods(results):
            for side in ("ours", "peer"):
                value = rate(results, f"step_{method}", side)
                mfu[f"step_{method}_mfu_{side}"] = value * step_flops_per_token(method, side) / peak if value else None
    ratios["forward_mfu"] = mfu.get("forward_mfu")

    sst = {}
    for method, entry in results.get("sst", {}).items():
        if entry.get("train_examples", "all") != "all":
            sst[f"sst_partial_epoch_seconds_{method}"] = entry.get("epoch_seconds")  # a smoke test, no target
            continue
        sst[f"sst_epoch_seconds_{method}"] = entry.get("epoch_seconds")
        sst[f"sst_peak_rss_mib_{method}"] = entry["peak_rss_bytes"] / 2**20 if entry.get("peak_rss_bytes") else None
    sst.update(sst_run_figures(results.get("sst_run", {})))

    targets = []
    for name, (label, target, sense) in TARGETS.items():
        value = ratios.get(name) if name in ratios else sst.get(name)
        met = None if value is None else (value >= target if sense == "min" else value <= target)
        targets.append({"name": name, "what": label, "target": target, "sense": sense, "value": value, "met": met})

    if peak:
        bounds.update(flop_bounds(results, peak, fwd_flops))
    # Decoding at batch 1 streams every weight once per token: bf16 weights, with the LM head (tied wte).
    weight_bytes = (2 if precision == "bf16" else 4) * (GPT2["params_matmul"] + GPT2["vocab"] * GPT2["d"])
    peer_b1 = best_rate(results, ["generate_b1_bf16", "generate_b1_fp32"], "peer")[0]
    for key, what in (("gemv_stream", f"the rate {precision} matrix-vector products stream weights here"),
                      ("memory_bandwidth", "the memory copy bandwidth")):
        rate_bytes = results.get(key, {}).get("bytes_per_s")
        if rate_bytes:
            bounds[f"generate_b1_{key}"] = {
                "ceiling_new_tokens_per_s": rate_bytes / weight_bytes,
                "ceiling_ratio_vs_peer": ratio(rate_bytes / weight_bytes, peer_b1),
                "formula": f"{what} / bytes of the {precision} weights read per step "
                           f"({2 if precision == 'bf16' else 4} * (85M blocks + 38.6M LM head))",
            }
    if peak:
        bounds["sst_epoch_seconds_loreft"] = {
            "forward_only_seconds_at_peak": SST_TRAIN["forward_flops"] / peak,
            "full_step_seconds_at_peak": 2 * SST_TRAIN["forward_flops"] / peak,
            "formula": f"one forward pass over SST's {SST_TRAIN['tokens']:,} training tokens = "
                       f"{SST_TRAIN['forward_flops'] / 1e12:.1f} TFLOP; a LoReFT step costs 2x that with plain autograd, "
                       "about 1x with the gradient-free prefix (last-position LoReFT, as measured)",
        }
    bounds["sst_later_epoch_fraction_loreft-top4"] = {
        "flop_fraction": TOP4_LATER_EPOCH_FLOP_FRACTION,
        "formula": "LoReFT's default positions (f1+l1) put an intervention on every row's first token at layer 8, "
                   "which every later token of that row depends on: an epoch after the first still runs layers 8-11 "
                   "forward (4 layer-passes) and backward for activation gradients (about 4 more) over every token, "
                   "against 12 forward + 4 backward layer-passes in the first epoch",
    }
    gemv = results.get("gemv_stream", {}).get("bytes_per_s")
    loreft_run = results.get("sst_run", {}).get("loreft", {})
    if gemv and precision == "bf16" and len(loreft_run.get("epoch_seconds") or []) > 1:
        # A later epoch of last-position LoReFT runs each step's 8 last tokens alone through the 12 layers, forward
        # and back: matrix-vector-like products that read every frozen bf16 matrix twice (forward, and the
        # backward's input gradients) whatever the batch's lengths.
        steps = -(-SST_TRAIN["sentences"] // 8)
        epochs = loreft_run["epoch_seconds"]
        bounds["sst_run_over_first_epoch_loreft"] = {
            "later_epoch_floor_seconds": steps * 2 * 2 * GPT2["params_matmul"] / gemv,
            "later_epoch_seconds": max(epochs[1:]),
            "later_epoch_ms_per_step": 1e3 * max(epochs[1:]) / steps,
            "later_epoch_seconds_needed": epochs[0] * (TARGETS["sst_run_over_first_epoch_loreft"][1] - 1)
                                          / (len(epochs) - 1),
            "formula": f"{steps:,} steps of batch 8 an epoch, each reading the 85M frozen bf16 weights twice "
                       "(forward, backward for input gradients) at the rate bf16 matrix-vector products stream them "
                       "here",
        }
    results["ratios"] = ratios
    results["ratios_of_best_steps"] = best_step_ratios(results)
    results["checks"] = cross_checks(results)
    results["mfu"] = mfu
    results["sst_summary"] = sst
    results["targets"] = targets
    results["bounds"] = bounds
    results["flop_formula"] = (
        "forward FLOPs = B*T*L*(24*d^2 + 4*T*d): 2 FLOPs per multiply-add over the qkv, attention-out and two "
        "FFN matrices (12*d^2 weights per layer) plus QK^T and AV over the full TxT square; no LM head (the forward "
        "figure ends at the last hidden state). gpt2, T=128: %.1f MFLOP/token. Training step: 3x forward with "
        "weight gradients (full), 2x without (LoRA, LoReFT: frozen base, activation gradients only); ours for LoReFT "
        "at the last position: 1x forward plus the backward of one token (the earlier tokens run without "
        "gradients)." % (fwd_flops / 1e6)
    )


# An epoch after the first of LoReFT (f1+l1) on the top four layers, in layer-passes: (4 forward + 4 backward) /
# (12 forward + 4 backward) of the first. The FLOPs' floor for sst_later_epoch_fraction_loreft-top4.
TOP4_LATER_EPOCH_FLOP_FRACTION = (4 + 4) / (12 + 4)


def best_precision(results: dict) -> str:
    """The precision `--precision auto` picks on the measured machine (bf16 for results from before it was
    recorded): every MFU and bound is against that precision's matmul peak."""
    return results.get("machine", {}).get("best_precision", "bf16")


def sst_run_figures(runs: dict) -> dict:
    """From the multi-epoch SST runs: each run's training seconds, its slowest epoch after the first (alone and as
    a fraction of the first) and the run over its first epoch. Runs on part of the training set (a smoke test)
    are named sst_partial_..., held to no target."""
    out = {}
    for name, entry in runs.items():
        epochs = entry.get("epoch_seconds") or []
        if not epochs:
            continue
        prefix = "sst" if entry.get("train_examples", "all") == "all" else "sst_partial"
        out[f"{prefix}_run_seconds_{name}"] = sum(epochs)
        if len(epochs) > 1:
            later = max(epochs[1:])
            out[f"{prefix}_later_epoch_seconds_{name}"] = later
            out[f"{prefix}_later_epoch_fraction_{name}"] = later / epochs[0] if epochs[0] else None
            out[f"{prefix}_run_over_first_epoch_{name}"] = sum(epochs) / epochs[0] if epochs[0] else None
    return out


def best_step_ratios(results: dict) -> dict:
    """Ours / peer from each side's fastest step: less sensitive to load from other processes than medians
    (contention only ever slows a step down), so worth a look when the two disagree."""
    out = {}
    for name, figure in results["figures"].items():
        ours, peer = (figure.get(side, {}).get("units_per_s_best") for side in ("ours", "peer"))
        out[name] = ratio(ours, peer)
    return out


def cross_checks(results: dict) -> dict:
    """Both sides must compute the same function on the same weights and inputs, or the timings compare
    different work: fp32 forward outputs agree closely and fp32 greedy generation picks the same tokens."""
    checks = {}
    fwd = results["figures"].get("forward_fp32", {})
    a, b = (fwd.get(side, {}).get("info", {}).get("output_sample") for side in ("ours", "peer"))
    if a and b:
        diff = max(abs(x - y) for x, y in zip(a, b))
        checks["forward_fp32_max_abs_diff"] = diff
        checks["forward_fp32_same_function"] = diff < 1e-3
    for method in step_methods(results):
        for side in ("ours", "peer"):
            info = results["figures"].get(f"step_{method}", {}).get(side, {}).get("info", {})
            if "parameters_without_gradient" in info:
                checks[f"step_{method}_{side}_all_trainable_get_gradients"] = info["parameters_without_gradient"] == 0
    for batch in (1, 8):
        gen = results["figures"].get(f"generate_b{batch}_fp32", {})
        a, b = (gen.get(side, {}).get("info", {}).get("first_tokens") for side in ("ours", "peer"))
        if a and b:
            checks[f"generate_b{batch}_fp32_same_tokens"] = a == b
    return checks


def flop_bounds(results: dict, peak: float, fwd_flops: float) -> dict:
    """For each throughput target: the ratio ours would reach at 100% of the measured matmul peak (of the machine's
    precision), and the MFU ours needs to meet the target. A ceiling below the target means no implementation can
    meet it here."""
    out = {}
    for name, figure, method in (
        ("forward_vs_transformers", f"forward_{best_precision(results)}", None),
        ("lora_step_vs_peft", "step_lora", "lora"),
        ("loreft_step_vs_pyreft", "step_loreft", "loreft"),
        ("full_step_vs_transformers", "step_full", "full"),
    ):
        peer = rate(results, figure, "peer")
        if not peer:
            continue
        ours_flops, peer_flops = (fwd_flops, fwd_flops) if method is None else \
            (step_flops_per_token(method, "ours"), step_flops_per_token(method, "peer"))
        target = TARGETS.get(name, (None, None))[1]
        ceiling = peak / ours_flops
        out[name] = {
            "ceiling_tokens_per_s": ceiling,
            "ceiling_ratio_vs_peer": ceiling / peer,
            "peer_mfu": peer * peer_flops / peak,
            "mfu_needed_for_target": target * peer * ours_flops / peak if target else None,
            "fewer_flops_than_peer": ours_flops < peer_flops,
            "ours_mfu": (rate(results, figure, "ours") or 0) * ours_flops / peak or None,
        }
    return out


# ---------------------------------------------------------------------------------------- writing
def write_text(path: Path, text: str) -> None:
    with atomic_write(path) as out:
        out.write(text)


def write_json(results: dict, path: Path) -> None:
    write_text(path, json.dumps(results, indent=2, sort_keys=False) + "\n")


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "—"
    return f"{value:,.{digits}f}{suffix}"


def describe_sst(entry: dict) -> str:
    if "not_measured" in entry:
        return f"not measured: {entry['not_measured']}"
    if "error" in entry:
        return "failed: " + entry["error"].splitlines()[0]
    partial = "" if entry.get("train_examples", "all") == "all" else f" ({entry['train_examples']} sentences only)"
    return (f"epoch{partial} {fmt(entry.get('epoch_seconds'), 1)} s, whole run {fmt(entry.get('wall_seconds'), 1)} s, "
            f"peak RSS {fmt(entry.get('peak_rss_bytes', 0) / 2**20, 0)} MiB")


def describe_sst_run(entry: dict) -> str:
    if "not_measured" in entry:
        return f"not measured: {entry['not_measured']}"
    if "error" in entry or "log_error" in entry:
        return "failed: " + (entry.get("error") or entry["log_error"]).splitlines()[0]
    partial = "" if entry.get("train_examples", "all") == "all" else f" ({entry['train_examples']} sentences only)"
    epochs = " / ".join(fmt(seconds, 1) for seconds in entry["epoch_seconds"])
    return (f"epochs{partial} {epochs} s, run {fmt(entry.get('run_seconds'), 1)} s ({entry.get('precision')}), "
            f"{describe_cache(entry.get('cache'))}, peak RSS {fmt(entry.get('peak_rss_bytes', 0) / 2**20, 0)} MiB")


def describe_cache(cache) -> str:
    if not cache:
        return "nothing cached"
    held = cache.get("ram_bytes", 0) + cache.get("disk_bytes", 0)
    return f"cache {cache.get('rows', 0):,} rows, {fmt(held / 2**20, 0)} MiB ({fmt(cache.get('disk_bytes', 0) / 2**20, 0)} on disk)"


def summary(results: dict) -> str:
    lines = ["", "target                          value      target  status"]
    for t in results["targets"]:
        status = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        lines.append(f"{t['name']:<30} {fmt(t['value']):>8}  {('>=' if t['sense'] == 'min' else '<=')}"
                     f"{t['target']:<6} {status}")
    return "\n".join(lines)


FIGURE_LABELS = {
    "forward_fp32": "forward, fp32 (both sides)",
    "forward_bf16": "forward, bf16 (ours: bf16 weights; transformers: autocast)",
    "step_full": "training step, full fine-tuning",
    "step_lora": "training step, LoRA r=8 (peft: c_attn; ours: query,key,value)",
    "step_loreft": "training step, LoReFT r=4, 12 layers, last position",
    **{f"step_{m}": f"training step, {m} r=4, 12 layers, last position (pyreft's {kind}Intervention)"
       for m, kind in common.REFT_INTERVENTIONS.items() if m != "loreft"},
    "step_lora_c_attn": "training step, LoRA r=8 on c_attn (both sides)",
    "step_dora": "training step, DoRA r=8 on c_attn (both sides)",
    "step_ia3": "training step, (IA)^3 on c_attn and the FFN (peft's GPT-2 default; both sides)",
    "step_prompt": "training step, prompt tuning, 20 virtual tokens",
    "step_ptuning": "training step, P-tuning, 20 virtual tokens from an MLP encoder 768 wide",
    "step_prefix": "training step, prefix tuning, 20 virtual keys and values per layer",
    "generate_b1_bf16": "generate 128 tokens, batch 1, bf16",
    "generate_b1_fp32": "generate 128 tokens, batch 1, fp32",
    "generate_b8_bf16": "generate 128 tokens, batch 8, bf16",
    "generate_b8_fp32": "generate 128 tokens, batch 8, fp32",
}


def write_markdown(results: dict, path: Path) -> None:
    m = results.get("machine", {})
    flags = ", ".join(f for f, present in m.get("cpu_flags", {}).items() if present) or "—"
    peers = results.get("versions", {}).get("peers", {})
    out = [
        "# Benchmark results",
        "",
        "Written by `python bench/run.py` (see bench/README.md); every figure below is in bench/results.json.",
        "Ratios are ours / peer, higher is better, from medians of steps timed alternately on both sides.",
        "",
        "## Machine",
        "",
        f"- CPU: {m.get('cpu_model', '?')}, {m.get('usable_cpus', '?')} usable cores; flags: {flags}",
        f"- memory: {fmt((m.get('memory_bytes') or 0) / 2**30, 1)} GiB; {m.get('platform', '?')}",
        f"- python {m.get('python', '?')}, torch {m.get('torch', '?')}, {results.get('settings', {}).get('threads', '?')} "
        f"threads on both sides; peers: " + (", ".join(f"{k} {v}" for k, v in peers.items()) or "—"),
        f"- last run: {m.get('date', '?')} (each figure below records its own date, repeats and warmup in "
        "results.json)",
    ]
    peak = {dtype: entry for dtype, entry in results.get("matmul_peak", {}).items() if isinstance(entry, dict)}
    if peak:
        shapes = next(iter(peak.values()))["per_shape"]
        out.append(f"- matmul peak (best GEMM of {', '.join(shapes)}): "
                   + ", ".join(f"{dtype} {fmt(entry['flops_per_s'] / 1e9, 0)} GFLOP/s" for dtype, entry in peak.items()))
    out.append(f"- precision: {best_precision(results)}, what `--precision auto` picks here; both sides train at it")
    for precision, why in results.get("skipped", {}).items():
        out.append(f"- {precision} figures skipped: {why}")
    if results.get("gemv_stream"):
        dtype = {"bfloat16": "bf16", "float32": "fp32"}.get(results["gemv_stream"].get("dtype"), "bf16")
        out.append(f"- {dtype} matrix-vector streaming rate (batch-1 decoding's matmuls, weights beyond the caches): "
                   f"{fmt(results['gemv_stream']['bytes_per_s'] / 1e9, 1)} GB/s")
    if results.get("memory_bandwidth"):
        out.append(f"- memory copy bandwidth: {fmt(results['memory_bandwidth']['bytes_per_s'] / 1e9, 1)} GB/s")
    disturbed = [name for name, f in results["figures"].items()
                 if (f.get("other_processes_mean_cores") or 0) > BUSY_CORES]
    if disturbed:
        out += ["", f"**Warning: {', '.join(disturbed)} were measured on a busy machine** (other processes kept more "
                f"than {BUSY_CORES} cores busy meanwhile: column 'load' below). On 2 cores that slows single steps by "
                "up to 20x, unevenly for the two sides; those medians are unreliable, the fastest-step ratios less so. "
                "Re-run on a quiet machine for official figures."]
    out += ["", "## Targets", "", "| figure | value | target | status |", "|---|---|---|---|"]
    for t in results["targets"]:
        status = {True: "met", False: "**missed**", None: "not measured"}[t["met"]]
        value = fmt(t["value"], 3 if "mfu" in t["name"] else 2)
        out.append(f"| {t['name']} ({t['what']}) | {value} | {'≥' if t['sense'] == 'min' else '≤'} {t['target']} | {status} |")
    out += ["", "## Ratios", "", "| ratio | ours / peer |", "|---|---|"]
    for name, value in results["ratios"].items():
        if value is not None or name in TARGETS:  # a case not measured on this machine is left out, a target is not
            out.append(f"| {name} | {fmt(value, 3)} |")
    out += ["", "Ratios of each side's fastest step (contention only slows steps down, so these show the quiet-"
            "machine picture when the medians were disturbed):", ""]
    out += [f"- {name}: {fmt(value, 3)}" for name, value in results.get("ratios_of_best_steps", {}).items()]
    if results.get("checks"):
        out += ["", "Cross-checks (same weights, same inputs, same function on both sides): "
                + ", ".join(f"{k} = {v if not isinstance(v, float) else f'{v:.2e}'}" for k, v in results["checks"].items())]
    out += ["", "## Raw figures", "", "load: cores that other processes kept busy on average while the figure was "
            "timed (0 on a quiet machine).", "",
            "| measurement | ours (median / best) | peer (median / best) | unit | load | measured |",
            "|---|---|---|---|---|---|"]
    for name, entry in results["figures"].items():
        cells = []
        for side in ("ours", "peer"):
            s = entry.get(side, {})
            cells.append("error" if "error" in s or "error" in entry else
                         f"{fmt(s.get('units_per_s_median'), 1)} / {fmt(s.get('units_per_s_best'), 1)}" if s else "—")
        out.append(f"| {FIGURE_LABELS.get(name, name)} | {cells[0]} | {cells[1]} | {entry.get('unit', '?')}/s | "
                   f"{fmt(entry.get('other_processes_mean_cores'))} | {entry.get('measured_at', '?')} |")
    if results["mfu"]:
        out += ["", f"## Model FLOP utilisation (of the {best_precision(results)} matmul peak)", ""]
        out += [f"- {name}: {fmt(100 * value if value else None, 1, '%')}" for name, value in results["mfu"].items()]
        out += ["", results["flop_formula"]]
    out += ["", "## SST epochs (8,544 sentences, random gpt2 weights, the machine's precision)", "",
            "| method | epoch seconds | whole run seconds | peak RSS | load |", "|---|---|---|---|---|"]
    for method, entry in results.get("sst", {}).items():
        if "not_measured" in entry or "error" in entry:
            out.append(f"| {method} | {describe_sst(entry)} | | | |")
        else:
            partial = "" if entry.get("train_examples", "all") == "all" else f" ({entry['train_examples']} sentences only)"
            out.append(f"| {method} | {fmt(entry.get('epoch_seconds'), 1)}{partial} | {fmt(entry.get('wall_seconds'), 1)} | "
                       f"{fmt(entry['peak_rss_bytes'] / 2**20, 0)} MiB | {fmt(entry.get('other_processes_mean_cores'))} |")
    if not results.get("sst"):
        out.append("| — | not measured yet (`--only sst`) | | | |")
    out += ["", f"## SST runs ({SST_TRAIN['sentences']:,} sentences an epoch, random gpt2 weights, the machine's "
            "precision)", "",
            "Training seconds of each epoch (evaluation excluded): epochs after the first reuse what the frozen-part "
            "cache holds (tasks/feature_cache.py). Measured with `python bench/run.py --only sst-run`.", "",
            "| run | epoch seconds | run seconds | cache | peak RSS | load |", "|---|---|---|---|---|---|"]
    for name, entry in results.get("sst_run", {}).items():
        if "epoch_seconds" not in entry:
            out.append(f"| {name} | {describe_sst_run(entry)} | | | | |")
            continue
        partial = "" if entry.get("train_examples", "all") == "all" else f" ({entry['train_examples']} sentences only)"
        out.append(f"| {name} | {' / '.join(fmt(x, 1) for x in entry['epoch_seconds'])}{partial} | "
                   f"{fmt(entry.get('run_seconds'), 1)} | {describe_cache(entry.get('cache'))} | "
                   f"{fmt(entry.get('peak_rss_bytes', 0) / 2**20, 0)} MiB | {fmt(entry.get('other_processes_mean_cores'))} |")
    if not results.get("sst_run"):
        out.append("| — | not measured yet (`--only sst-run`) | | | | |")
    notes = [f"- {name}: {entry[key]}" for group in ("sst", "sst_run") for name, entry in results.get(group, {}).items()
             for key in entry if key.endswith("_note")]
    out += [""] + notes if notes else []
    out += ["", "## What bounds the targets", ""] + bound_notes(results)
    out += ["", "Where our time goes and the levers that remain: see bench/README.md, \"Profile\".", ""]
    write_text(path, "\n".join(out))


def bound_notes(results: dict) -> list[str]:
    notes = []
    for name, b in results.get("bounds", {}).items():
        if name == "sst_later_epoch_fraction_loreft-top4":
            measured = results.get("sst_summary", {}).get(name)
            notes.append(f"- {name}: {b['formula']}: at least {fmt(b['flop_fraction'])} of the first epoch's FLOPs, "
                         "so the 0.25 target needs the last-position variant (`--layers 8,9,10,11 --positions l1`, "
                         "whose later epochs run the last token only)."
                         + ("" if measured is None else
                            f" Measured {fmt(measured)}: above the FLOPs' floor because the first epoch's layers 0-7 "
                            "run forward only, without autograd's bookkeeping, dropout or interventions, cheaper per "
                            "FLOP than the four trained layers' forward and backward that every epoch repeats."))
            continue
        if name == "sst_run_over_first_epoch_loreft":
            notes.append(
                f"- {name}: {b['formula']}: a later epoch cannot take less than "
                f"{fmt(b['later_epoch_floor_seconds'], 0)} s; the 2.0 target needs later epochs of at most "
                f"{fmt(b['later_epoch_seconds_needed'], 0)} s; measured {fmt(b['later_epoch_seconds'], 0)} s "
                f"({fmt(b['later_epoch_ms_per_step'], 0)} ms a step). Profiled (bench/README.md, \"Profile\"): the matmuls take about half of a cached step; the "
                "rest is the per-op cost of about 10,000 aten calls a step (views and casts included: LoReFT's "
                "projections on each of the 12 layers forward and back, dropout, attention over the cached keys and "
                "values, assembling the cached rows), which no FLOP or byte count sees.")
            continue
        if name == "sst_epoch_seconds_loreft":
            target, floor = TARGETS[name][1], b["forward_only_seconds_at_peak"]
            tokens_per_sentence = SST_TRAIN["tokens"] / SST_TRAIN["sentences"]
            measured = results.get("sst_summary", {}).get(name)
            text = (f"- {name}: {b['formula']}: {fmt(floor, 0)} s for the forward pass alone "
                    f"at 100% of the matmul peak, {fmt(b['full_step_seconds_at_peak'], 0)} s for LoReFT steps with "
                    "plain autograd. Every training token must pass forward through all 12 layers once (the "
                    "intervention on layer 0 rules out reusing frozen layers' outputs), ")
            if floor > target:
                text += (f"so the {target:g} s target is out of reach on this machine for the gpt2 shape, whatever the "
                         "implementation; the gradient-free prefix (ours) brings an epoch towards the forward-only "
                         "figure.")
            else:
                text += (f"so the {target:g} s target needs {fmt(100 * floor / target, 0)}% of the matmul peak over the "
                         "forward FLOPs")
                text += "." if measured is None else (
                    f"; the measured {fmt(measured, 0)} s is {fmt(100 * floor / measured, 1)}%. The peak is that of "
                    f"large GEMMs: an SST batch is 8 sentences of {fmt(tokens_per_sentence, 1)} tokens on average, so each "
                    f"matmul has about {fmt(8 * tokens_per_sentence, 0)} rows (less with padding removed) and every op is "
                    "small, where the per-op cost weighs most (the cached-step profile in bench/README.md shows it for "
                    "later epochs).")
            notes.append(text)
            continue
        if name.startswith("generate_b1"):
            notes.append(
                f"- generate, batch 1: reading every weight once per token caps decoding at "
                f"{fmt(b['ceiling_new_tokens_per_s'], 0)} new tokens/s, "
                f"{fmt(b['ceiling_ratio_vs_peer'])}x the peer's best ({b['formula']}).")
            continue
        target = TARGETS.get(name, (None, None))[1]
        work = "our recipe's FLOPs (fewer than the peer's)" if b.get("fewer_flops_than_peer") else "the same FLOPs as the peer"
        line = (f"- {name}: doing {work}, at 100% of the {best_precision(results)} matmul peak, ours would reach "
                f"{fmt(b['ceiling_tokens_per_s'], 0)} tokens/s = {fmt(b['ceiling_ratio_vs_peer'])}x the peer, which "
                f"already runs at {fmt(100 * b['peer_mfu'], 1)}% MFU.")
        if target:
            needed = b["mfu_needed_for_target"]
            line += (f" The {target}x target needs {fmt(100 * needed, 1)}% MFU"
                     + (": beyond the peak, so it is reachable only by doing fewer FLOPs than the peer's recipe "
                        "(see bench/README.md, \"Levers\")." if needed > 1 else
                        f"; ours runs at {fmt(100 * b['ours_mfu'], 1)}%." if b.get("ours_mfu") else "."))
            forward_mfu = results.get("mfu", {}).get("forward_mfu")
            if b.get("fewer_flops_than_peer") and forward_mfu and forward_mfu < needed <= 1:
                line += (f" The {fmt(100 * needed, 1)}% needed is above the {fmt(100 * forward_mfu, 1)}% of our inference "
                         "forward pass, which bounds this "
                         "step in practice: the step is that forward pass in training mode (with dropout's random "
                         "masks) plus a backward, a head and an optimizer step, so it cannot run at a higher MFU.")
        notes.append(line)
    return notes or ["- (no peer figures yet)"]
