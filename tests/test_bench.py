"""bench/: the multi-epoch SST runs (group sst-run) on a tiny budget, and the figures and targets the report
derives from them. The benchmark's own timings are never asserted (no timed assertions)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.fixtures.shared import SHARED_DATA, SHARED_TOKENIZER, requires_shared_data, requires_shared_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def bench_module(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_run, report = bench_module("run"), bench_module("report")


def full_run(epochs):
    return {"epoch_seconds": epochs, "run_seconds": sum(epochs), "train_examples": "all", "precision": "bf16",
            "peak_rss_bytes": 2**30, "cache": {"rows": 9645, "ram_bytes": 2**20, "disk_bytes": 0}}


def test_the_report_derives_the_run_figures_and_holds_full_runs_to_the_targets(tmp_path):
    results = {"figures": {}, "sst": {}, "sst_run": {
        "last-linear-layer": full_run([120.0, 3.5, 4.0]),
        "loreft-top4": full_run([200.0, 100.0, 90.0]),
        "loreft": full_run([240.0, 60.0, 50.0]),
        "lora": {**full_run([30.0, 29.0]), "train_examples": 100},  # a smoke test: no target
    }}
    report.derive(results)
    figures = results["sst_summary"]
    assert figures["sst_run_seconds_last-linear-layer"] == pytest.approx(127.5)
    assert figures["sst_later_epoch_seconds_last-linear-layer"] == 4.0
    assert figures["sst_later_epoch_fraction_loreft-top4"] == pytest.approx(0.5)
    assert figures["sst_run_over_first_epoch_loreft"] == pytest.approx(350 / 240)
    assert figures["sst_partial_run_seconds_lora"] == 59.0 and "sst_run_seconds_lora" not in figures
    met = {t["name"]: t["met"] for t in results["targets"]}
    assert met["sst_later_epoch_seconds_last-linear-layer"] is True
    assert met["sst_later_epoch_fraction_loreft-top4"] is False
    assert met["sst_run_over_first_epoch_loreft"] is True
    report.write_markdown(results, tmp_path / "RESULTS.md")
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| last-linear-layer | 120.0 / 3.5 / 4.0 | 127.5 | cache 9,645 rows, 1 MiB (0 on disk) |" in text
    assert "| lora | 30.0 / 29.0 (100 sentences only) |" in text
    assert "sst_later_epoch_fraction_loreft-top4: LoReFT's default positions" in text


def test_unknown_runs_are_refused_naming_the_flag(capsys):
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--only", "sst-run", "--sst-runs", "lora,nope"])
    assert "--sst-runs: unknown runs ['nope']" in capsys.readouterr().err


@pytest.mark.slow  # a training run in a fresh process
def test_an_sst_run_on_a_tiny_budget_reports_every_epoch_and_the_cache(tmp_path, task_files):
    """The command `bench/run.py --only sst-run` runs for each method, on 8 sentences and a tiny model."""
    entry = bench_run.sst_run("last-linear-layer", task_files.model, task_files.data, task_files.tokenizer, tmp_path,
                              threads=1, max_examples=8, epochs=2)
    assert "error" not in entry, entry.get("error")
    assert len(entry["epoch_seconds"]) == 2 and entry["run_seconds"] == pytest.approx(sum(entry["epoch_seconds"]))
    assert entry["train_examples"] == 8 and entry["precision"] in ("fp32", "bf16") and entry["peak_rss_bytes"] > 0
    # The 8 training and the dev sentences; the test sentences, predicted once at the end, are not kept.
    assert entry["cache"]["rows"] >= 8 and entry["cache"]["boundary"] > 2  # the tiny model has 2 layers: features
    assert "--precision auto" in entry["command"] and "--epochs 2" in entry["command"]
    assert (tmp_path / "sst-run-last-linear-layer-log.json").is_file()
    assert not (tmp_path / "sst-run-last-linear-layer").exists()
    assert "epochs (8 sentences only)" in report.describe_sst_run(entry)


def test_where_bf16_is_emulated_the_bench_measures_fp32_only_and_says_so():
    pairs = bench_run.comparisons("weights", {"forward", "step", "generate"}, best="fp32")
    assert pairs and not [p["name"] for p in pairs if "bf16" in p["name"]]
    assert {p["ours"][1]["precision"] for p in pairs if p["group"] == "step"} == {"fp32"}
    native = bench_run.comparisons("weights", {"forward", "step", "generate"}, best="bf16")
    assert {"forward_bf16", "generate_b1_bf16", "generate_b8_bf16"} <= {p["name"] for p in native}
    assert {p["peer"][1]["precision"] for p in native if p["group"] == "step"} == {"bf16"}

    results = {"figures": {"forward_bf16": {}, "forward_fp32": {}}, "sst": {}, "matmul_peak": {"bf16": {}, "fp32": {}}}
    bench_run.note_skipped_precisions(results, "fp32")
    assert set(results["figures"]) == {"forward_fp32"} and set(results["matmul_peak"]) == {"fp32"}
    assert "no bf16 instructions" in results["skipped"]["bf16"]


def test_mfu_is_against_the_peak_of_the_precision_used(tmp_path):
    forward = {"ours": {"units_per_s_median": 500.0}, "peer": {"units_per_s_median": 400.0}}
    peaks = {"bf16": {"flops_per_s": 400e9, "per_shape": {"a": 1}}, "fp32": {"flops_per_s": 200e9, "per_shape": {"a": 1}}}
    per_token = report.forward_flops_per_token(bench_run.common.FORWARD_SHAPE[1])
    for precision in ("fp32", "bf16"):
        results = {"figures": {f"forward_{precision}": forward}, "sst": {}, "matmul_peak": peaks,
                   "machine": {"best_precision": precision},
                   "skipped": {} if precision == "bf16" else {"bf16": "emulated here"}}
        report.derive(results)
        assert results["mfu"]["forward_mfu"] == pytest.approx(500 * per_token / peaks[precision]["flops_per_s"])
        assert results["ratios"]["forward_vs_transformers"] == pytest.approx(1.25)
        report.write_markdown(results, tmp_path / "RESULTS.md")
        text = (tmp_path / "RESULTS.md").read_text()
        assert f"## Model FLOP utilisation (of the {precision} matmul peak)" in text
        assert ("- bf16 figures skipped: emulated here" in text) == (precision == "fp32")


def compare_row(task, method, model, seed, dev):
    return {"task": task, "method": method, "model": model, "seed": seed, "dev": dev}


def test_pretrain_compare_pairs_the_models_by_seed_and_says_which_gains_are_beyond_noise():
    pretrain_compare = bench_module("pretrain_compare")
    rows = [compare_row("sst", "lora", "pretrained", s, v) for s, v in ((1, 0.40), (2, 0.42), (3, 0.41))]
    rows += [compare_row("sst", "lora", "random", s, v) for s, v in ((1, 0.25), (2, 0.26), (3, 0.27))]
    # A gain whose sign flips between seeds is noise; a failed run (dev None) is left out of both summaries.
    rows += [compare_row("sst", "full", "pretrained", s, v) for s, v in ((1, 0.30), (2, 0.20), (3, None))]
    rows += [compare_row("sst", "full", "random", s, v) for s, v in ((1, 0.25), (2, 0.26), (3, 0.27))]
    summary = {(r["method"], r["model"]): r for r in pretrain_compare.summarise(rows)}
    assert summary["lora", "pretrained"]["mean"] == pytest.approx(0.41)
    assert summary["lora", "pretrained"]["std"] == pytest.approx(0.01)
    assert summary["full", "pretrained"]["seeds"] == 2
    gains = {r["method"]: r for r in pretrain_compare.pretraining_gains(rows)}
    assert gains["lora"]["gain"] == pytest.approx(0.15) and gains["lora"]["beyond_noise"] is True
    assert gains["lora"]["p"] < 0.01
    assert gains["full"]["seeds"] == 2 and gains["full"]["beyond_noise"] is False


@requires_shared_data
@requires_shared_tokenizer
@pytest.mark.slow  # pretrains (2 steps) and runs 8 compare runs and 4 memorisation cases on the small preset
def test_pretrain_compare_runs_end_to_end_and_a_rerun_reuses_every_case(tmp_path):
    pretrain_compare = bench_module("pretrain_compare")
    work, out = tmp_path / "work", tmp_path / "out"
    argv = ["--tokenizer", str(SHARED_TOKENIZER), "--data-dir", str(SHARED_DATA), "--work-dir", str(work),
            "--out", str(out), "--seeds", "1,2", "--tasks", "sst", "--methods", "last-linear-layer,loreft",
            "--layers", "0", "--lengths", "8,16", "--memorise-steps", "2", "--threads", "1",
            "--pretrain-flags", "--steps 2 --batch-size 2 --max-eval-blocks 2 --eval-every-steps 2 --precision fp32",
            "--compare-flags", "--epochs 1 --max-train-examples 8 --max-eval-examples 8 --batch-size 4"]
    assert pretrain_compare.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert len(results["compare"]) == 8 and not [r for r in results["compare"] if r["error"]]
    assert {(r["model"], r["seed"]) for r in results["compare"]} == {(m, s) for m in ("pretrained", "random")
                                                                     for s in (1, 2)}
    cases = {(r["model"], r["length"]): r for r in results["memorisation"]}
    assert set(cases) == {(m, n) for m in ("pretrained", "random") for n in (8, 16)}
    assert all(r["steps"] <= 2 and 0 <= r["recovered"] <= r["length"] for r in cases.values())
    report_text = (out / "RESULTS.md").read_text()
    assert "## What pretraining buys: pretrained minus random, paired over seeds" in report_text
    assert "| sst | loreft | 2 |" in report_text and "## Memorisation" in report_text
    assert (out / "compare.png").stat().st_size > 0 and (out / "memorisation.png").stat().st_size > 0

    kept = {path.name: path.read_text() for path in (work / "memorise").iterdir()}
    assert len(kept) == 4
    assert pretrain_compare.main(argv) == 0  # every run and case reused
    again = json.loads((out / "results.json").read_text())
    assert again["memorisation"] == results["memorisation"]
    assert [r["dev"] for r in again["compare"]] == [r["dev"] for r in results["compare"]]
    assert {path.name: path.read_text() for path in (work / "memorise").iterdir()} == kept
    with pytest.raises(SystemExit, match="other settings"):
        pretrain_compare.main([a if a != "2" else "3" for a in argv] + ["--skip", "compare"])


@pytest.mark.parametrize("method, per_layer", [("loreft", 2 * 4 * 32 + 4), ("noreft", 2 * 4 * 32 + 4),
                                               ("consreft", 4 * 32 + 4), ("lobireft", 4 * 32 + 4),
                                               ("direft", 2 * 4 * 32 + 4), ("nodireft", 2 * 4 * 32 + 4)])
def test_our_side_of_each_reft_step_case_trains_what_pyreft_s_intervention_holds(tmp_path, method, per_layer):
    """The counts pyreft's <Kind>Intervention(embed_dim, low_rank_dimension=4, add_bias=False) holds per layer
    (rotation or projection r x d, learned source r x d + r, or the source bias alone for consreft and lobireft):
    both sides train the same parameters, so the step ratio is like for like."""
    import torch

    from models.config import GPT2Config
    from models.gpt2 import GPT2Model

    ours = bench_module("ours")
    torch.manual_seed(0)
    GPT2Model(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64,
                         vocab_size=ours.common.VOCAB_SIZE)).save_pretrained(tmp_path / "weights")
    case = ours.train_step_case(str(tmp_path / "weights"), method, precision="fp32")
    head = 5 * 32 + 5
    assert case.info["trainable_parameters"] == 2 * per_layer + head and case.info["parameters_without_gradient"] == 0
    assert case.info["last_token_path"] == "gradients for the last 1 tokens only"
    assert case.step() == 8 * 64
    assert f"step_{method}" in {p["name"] for p in bench_run.comparisons("weights", {"step"})}


def test_each_reft_step_case_gets_its_ratio_against_pyreft_and_the_last_position_flop_floor():
    step = {"ours": {"units_per_s_median": 300.0}, "peer": {"units_per_s_median": 200.0}}
    results = {"figures": {"step_consreft": step, "step_lora": step}, "sst": {},
               "matmul_peak": {"bf16": {"flops_per_s": 1e12, "per_shape": {"a": 1}}}, "machine": {"best_precision": "bf16"}}
    report.derive(results)
    assert results["ratios"]["consreft_step_vs_pyreft"] == pytest.approx(1.5)
    assert results["ratios"]["nodireft_step_vs_pyreft"] is None  # not measured
    ours_flops, peer_flops = (report.step_flops_per_token("consreft", side) for side in ("ours", "peer"))
    assert ours_flops < peer_flops == report.step_flops_per_token("lora", "peer")  # no gradients before the last token
    assert results["mfu"]["step_consreft_mfu_ours"] == pytest.approx(300 * ours_flops / 1e12)
