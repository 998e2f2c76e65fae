"""compare.py end to end on a tiny random model: variants and their parser, seeds with statistics and a baseline,
the table, comparison.csv / .json / .md and the plots, one run directory per variant and seed, per-variant
flags, budgets, a failing run recorded beside the others, --resume reusing finished runs and refusing changed
settings, an interruption keeping finished runs, and the command-line errors raised before anything trains."""
from __future__ import annotations

import csv
import json
import statistics
import warnings

import pytest
import torch

import compare
from compare import main, parse_command
from comparison.report import human_bytes, human_number, human_percent, style
from comparison.stats import t_quantile
from comparison.variants import Variant, parse_variant, read_variant_file, seed_list
from models.gpt2 import GPT2Model
from models.peft import MethodConfig, apply_method, parameter_summary
from models.tokenizer import GPT2Tokenizer
from tasks import get_task
from tests.fixtures.task_files import base_args

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]
VARIANTS = ["lora", "lr1=loreft --rank 1"]
NAMES = ["lora", "lr1"]
SEEDS = [11711, 11712]
HEADERS = ["variant", "seeds", "trainable params", "trainable %", "adapter size", "dev accuracy (mean ± std)",
           "accuracy 95% CI", "Δ accuracy vs lora [95% CI]", "accuracy p", "dev macro_f1 (mean ± std)",
           "macro_f1 95% CI", "Δ macro_f1 vs lora [95% CI]", "macro_f1 p", "steps", "train s", "train tokens/s",
           "peak memory", "ms/example", "lr", "status", "runs as"]
CSV_FIELDS = ["variant", "method", "flags", "seeds", "runs", "status", "budget", "trainable_params", "total_params",
              "trainable_percent", "adapter_bytes"] + [
    f"dev_{m}_{part}" for m in ("accuracy", "macro_f1")
    for part in ("mean", "std", "ci_low", "ci_high", "diff", "diff_low", "diff_high", "p", "pairs")] + [
    "steps", "train_seconds", "epoch_seconds", "train_tokens_per_second", "peak_memory_bytes",
    "inference_ms_per_example", "lr", "error"]
PLOTS = ["comparison.png", "learning_curves.png", "metric_vs_seconds.png"]


def compare_args(out, task_files, variants, *extra, **overrides) -> list[str]:
    """The shared flags of the task tests' quick runs (compare.py sets --method, --output-dir, --predictions-dir)."""
    shared = base_args(out, task_files, **{"method": None, "output_dir": None, "predictions_dir": None,
                                           "max_train_examples": 8, "max_eval_examples": 6, **overrides})
    return ["--task", "sst", *(["--variants", *variants] if variants else []), "--output-dir", str(out), *shared, *extra]


def run_compare(args, capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def table_lines(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ")]


def refused(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit:
        main(args)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and err.count("error:") == 1 and "usage: compare.py" in err
    return err


@pytest.fixture(scope="module")
def compared(tmp_path_factory, task_files):
    """Two variants with two seeds each, against lora as the baseline, shared by the tests that read its outputs."""
    out = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main(compare_args(out, task_files, VARIANTS, "--seeds", "2", "--baseline", "lora", "--in-process"))
    finally:
        torch.set_num_threads(threads)
    return code, out


# ----------------------------------------------------------------------------------------------- variants
def test_the_variant_parser():
    assert parse_variant("lora") == Variant("lora", "lora", ())
    assert parse_variant("lora-r8=lora --rank 8") == Variant("lora-r8", "lora", ("--rank", "8"))
    assert parse_variant(" loreft-r1 = loreft --rank 1 --positions l1") == \
        Variant("loreft-r1", "loreft", ("--rank", "1", "--positions", "l1"))
    assert parse_variant("slow=lora --lr=5e-4").flags == ("--lr=5e-4",)
    assert parse_variant("lora-r8=lora --rank 8").describe() == "lora --rank 8"
    for text, message in [("nope", "unknown method 'nope'"), ("x=nope --rank 2", "unknown method 'nope'"),
                          ("lora --rank 8", 'needs a name, as in "lora-custom=lora --rank 8"'),
                          ("x=", "give NAME=METHOD FLAGS"), ("x=lora 'open", "No closing quotation")]:
        with pytest.raises(ValueError, match=message):
            parse_variant(text)


def test_variant_files_in_json_and_toml(tmp_path):
    toml = tmp_path / "v.toml"
    toml.write_text('[variants]\nlora-r8 = "lora --rank 8"\nloreft = "loreft"\n')
    as_json = tmp_path / "v.json"
    as_json.write_text(json.dumps({"variants": ["lora", "r1=loreft --rank 1"]}))
    assert read_variant_file(toml) == [Variant("lora-r8", "lora", ("--rank", "8")), Variant("loreft", "loreft")]
    assert read_variant_file(as_json) == [Variant("lora", "lora"), Variant("r1", "loreft", ("--rank", "1"))]
    bad = tmp_path / "bad.toml"
    bad.write_text("[variants]\nx = 3\n")
    with pytest.raises(ValueError, match=r"bad.toml: variant 'x' must be a string"):
        read_variant_file(bad)
    bad.write_text('[variants]\nx = "nope"\n')
    with pytest.raises(ValueError, match=r"bad.toml: variant 'x=nope': unknown method"):
        read_variant_file(bad)
    with pytest.raises(ValueError, match=r"v.yaml: cannot read"):
        read_variant_file(tmp_path / "v.yaml")


def test_seed_lists():
    assert seed_list("3", 11711) == [11711, 11712, 11713] and seed_list("1,5,9", 0) == [1, 5, 9]
    assert seed_list("7,", 0) == [7]
    for text in ("0", "x", "1,1"):
        with pytest.raises(ValueError):
            seed_list(text, 0)


def test_a_variant_keeps_its_style_in_every_comparison():
    # Derived from a hash of the name (not Python's per-process hash): the same in every process and comparison.
    assert style("lora") == ("#9467bd", "p") and style("loreft") == ("#bcbd22", "P")
    assert len({style(f"v{i}") for i in range(20)}) > 10


def test_variants_of_one_comparison_never_share_a_colour_while_the_palette_lasts():
    from comparison.report import MARKERS, PALETTE, styles

    names = [f"v{i}" for i in range(40)]
    clashing = next((a, b) for a in names for b in names if a < b and style(a)[0] == style(b)[0])
    looks = styles(clashing)
    assert looks[clashing[0]] == style(clashing[0]) and looks[clashing[1]][0] != style(clashing[0])[0]
    assert styles(reversed(clashing)) == looks  # the same set, the same styles, whatever the order
    ten = styles(names[:len(PALETTE)])
    assert len({colour for colour, _ in ten.values()}) == len(PALETTE)
    for count in (40, len(PALETTE) * len(MARKERS)):  # more variants than colours: colours repeat, pairs do not
        many = styles(f"v{i}" for i in range(count))
        assert len(set(many.values())) == count
    assert styles(["lora", "loreft"]) == {"lora": style("lora"), "loreft": style("loreft")}  # no clash: unmoved


def test_variant_flags_go_to_their_runs_and_shared_flags_to_all(tmp_path, task_files):
    args, runs = parse_command(compare_args(
        tmp_path, task_files, ["full", "lora", "lr=loreft --positions l1", "auto=loreft --layers auto:1"], "--rank", "2",
        "--lora-targets", "query", "--method-args", "lr=--lr 0.01", "--seeds", "5,6"))
    by = {(r.variant.name, r.seed): r.config for r in runs}
    assert [r.key for r in runs][:3] == ["full/seed-5", "full/seed-6", "lora/seed-5"] and len(runs) == 8
    assert by["full", 5].method.to_dict() == {"method": "full"} and by["full", 5].learning_rate == 1e-5
    assert (by["lora", 6].method.rank, by["lora", 6].method.targets, by["lora", 6].learning_rate) == (2, ("query",), 1e-3)
    assert (by["lr", 5].method.rank, by["lr", 5].method.positions, by["lr", 5].lr) == (2, "l1", 0.01)
    assert by["auto", 5].method.layers == "auto:1" and by["lr", 5].method.layers is None
    assert {c.seed for c in by.values()} == {5, 6} and {c.max_train_examples for c in by.values()} == {8}
    assert by["lora", 6].run_dir == tmp_path / "lora" / "seed-6"
    assert by["lora", 6].predictions_dir == str(tmp_path / "lora" / "seed-6" / "predictions")
    args, runs = parse_command(compare_args(tmp_path, task_files, [], "--methods", "lora,loreft"))
    assert [r.key for r in runs] == ["lora/seed-11711", "loreft/seed-11711"]  # --methods: each a variant


# ----------------------------------------------------------------------------------------------- the report
@pytest.mark.slow  # the comparison: two variants, two seeds
def test_table_has_a_row_per_variant_with_statistics(compared, capsys, task_files):
    code, out = compared
    assert code == 0
    # The table printed is the one recomputed from comparison.json on a --resume that reuses every run.
    code, printed, _ = run_compare(compare_args(out, task_files, VARIANTS, "--seeds", "2", "--baseline", "lora",
                                                "--resume", "--in-process"), capsys)
    assert code == 0 and printed.count("finished earlier, result reused") == 4
    assert "budget: 1 epoch; seeds: 11711, 11712" in printed
    header, *rows = table_lines(printed)
    assert header == HEADERS
    assert [row[0] for row in rows] == NAMES and all(row[19] == "finished" and row[1] == "2/2" for row in rows)
    lora, lr1 = rows
    assert lora[7] == "baseline" and lora[8] == "-" and lr1[-1] == "loreft --rank 1"
    for row in rows:
        mean, std = row[5].split(" ± ")
        low, high = row[6].strip("[]").split(", ")
        assert float(low) < float(mean) < float(high) and float(std) >= 0
        assert row[3].endswith("%") and row[4].endswith("iB") and row[16].endswith("iB") and row[18] == "0.001"
    assert lr1[7].startswith(("+", "-")) and "[" in lr1[7] and 0 <= float(lr1[8]) <= 1


@pytest.mark.slow
def test_csv_and_json_hold_the_statistics_of_the_runs(compared, task_files):
    _, out = compared
    with open(out / "comparison.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == CSV_FIELDS
        csv_rows = list(reader)
    saved = json.loads((out / "comparison.json").read_text())
    assert [row["variant"] for row in csv_rows] == NAMES == [row["variant"] for row in saved["rows"]]
    assert saved["settings"]["seeds"] == SEEDS and saved["settings"]["baseline"] == "lora"
    assert saved["settings"]["budget"] == "1 epoch" and saved["settings"]["max_train_examples"] == 8
    runs = {(r["variant"], r["seed"]): r for r in saved["runs"]}
    assert sorted(runs) == [(v, s) for v in NAMES for s in SEEDS]
    accuracy = {key: r["result"]["dev_metrics"]["accuracy"] for key, r in runs.items()}
    for row, csv_row in zip(saved["rows"], csv_rows):
        values = [accuracy[row["variant"], s] for s in SEEDS]
        assert row["dev_accuracy_mean"] == pytest.approx(statistics.mean(values)) == float(csv_row["dev_accuracy_mean"])
        half = t_quantile(1) * statistics.stdev(values) / 2 ** 0.5
        assert row["dev_accuracy_std"] == pytest.approx(statistics.stdev(values))
        assert (row["dev_accuracy_ci_low"], row["dev_accuracy_ci_high"]) == \
            (pytest.approx(statistics.mean(values) - half), pytest.approx(statistics.mean(values) + half))
        seconds = [sum(runs[row["variant"], s]["result"]["epoch_seconds"]) for s in SEEDS]
        assert row["train_seconds"] == pytest.approx(statistics.median(seconds))
        assert row["steps"] == 2  # 8 examples in batches of 4
    lr1 = saved["rows"][1]
    assert lr1["dev_accuracy_diff"] == pytest.approx(statistics.mean(
        accuracy["lr1", s] - accuracy["lora", s] for s in SEEDS)) and lr1["dev_accuracy_pairs"] == 2
    assert "dev_accuracy_diff" not in saved["rows"][0]  # the baseline itself
    tokenizer = GPT2Tokenizer.from_pretrained(task_files.tokenizer)
    for (name, _), run in runs.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gpt = GPT2Model.from_pretrained(str(task_files.model))
        apply_method(gpt, MethodConfig.from_dict(run["config"]["method"]))
        summary = parameter_summary(get_task("sst").build_model(gpt, tokenizer))
        row = saved["rows"][NAMES.index(name)]
        assert row["trainable_params"] == run["result"]["trainable_params"] == summary["trainable"]


@pytest.mark.slow
def test_the_markdown_report_and_the_plots(compared):
    _, out = compared
    report = (out / "comparison.md").read_text()
    assert report.startswith("# Comparison: sst, random:tiny, budget 1 epoch")
    for part in ("## Settings", "| seeds | [11711, 11712] |", "| baseline | lora |", "- `lr1`: `loreft --rank 1`",
                 "## Machine", "- torch: ", "## Results", "| variant | seeds |", "paired t-test over seeds",
                 "![dev metric against trainable parameters](comparison.png)", "(learning_curves.png)",
                 "(metric_vs_seconds.png)"):
        assert part in report, part
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_one_run_directory_per_variant_and_seed(compared):
    _, out = compared
    for name, method in (("lora", "lora"), ("lr1", "loreft")):
        for seed in SEEDS:
            run = out / name / f"seed-{seed}"
            assert (run / "log.json").is_file() and (run / "best" / "adapter.safetensors").is_file()
            assert json.loads((run / "log.json").read_text())["config"]["seed"] == seed
            assert (run / "predictions" / f"{method}-sst-dev-out.csv").is_file()


# ----------------------------------------------------------------------------------------------- nothing lost
@pytest.mark.slow
def test_resume_with_changed_settings_refuses_before_anything_runs(compared, task_files, capsys):
    _, out = compared
    before = {name: (out / name).read_bytes() for name in ["comparison.csv", "comparison.json", "comparison.md", *PLOTS]}
    args = compare_args(out, task_files, VARIANTS, "--seeds", "2", "--baseline", "lora", "--resume",
                        max_train_examples=10)
    err = refused(args, capsys)
    assert "--resume: settings changed for lora/seed-11711 since the comparison in" in err
    assert "(max_train_examples: it ran with 8, this command gives 10); " in err and "another --output-dir" in err
    err = refused(compare_args(out, task_files, VARIANTS, "--seeds", "2", "--resume", "--method-args", "lr1=--rank 2"),
                  capsys)
    assert "--resume: settings changed for lr1/seed-11711" in err
    assert "(method.alpha: it ran with 1.0, this command gives 2.0; method.rank: it ran with 1, this command gives 2)" in err
    err = refused(compare_args(out, task_files, ["lora"], "--seeds", "2", "--resume"), capsys)
    assert "also has lr1/seed-11711, lr1/seed-11712, which this command leaves out" in err
    err = refused(compare_args(out, task_files, VARIANTS), capsys)  # no --resume at all
    assert "an earlier comparison is there: pass --resume" in err
    assert {name: (out / name).read_bytes() for name in before} == before


@pytest.mark.slow  # trains three times
def test_an_interruption_keeps_finished_runs_and_resume_finishes_the_rest(tmp_path, task_files, capsys, monkeypatch):
    real, calls = compare.run_one, []

    def interrupted_second(run):
        calls.append(run.key)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(run)

    monkeypatch.setattr(compare, "run_one", interrupted_second)
    args = compare_args(tmp_path, task_files, ["lora", "loreft"], "--in-process", "--budget-steps", "3", batch_size=2)
    code, _, err = run_compare(args, capsys)
    assert code == 130 and "run the same command with --resume" in err
    saved = json.loads((tmp_path / "comparison.json").read_text())
    assert [(r["variant"], r["result"]["stopped"]) for r in saved["runs"]] == [("lora", "finished")]
    code, printed, _ = run_compare(args + ["--resume"], capsys)
    assert code == 0 and calls == ["lora/seed-11711", "loreft/seed-11711", "loreft/seed-11711"]
    assert "lora/seed-11711: finished earlier" in printed and "budget: 3 optimizer steps" in printed
    rows = {row[0]: row for row in table_lines(printed)[1:]}
    assert rows["lora"][HEADERS.index("steps") - 4] == "3" == rows["loreft"][HEADERS.index("steps") - 4]  # no baseline
    assert "budget 3 optimizer steps" in (tmp_path / "comparison.md").read_text().splitlines()[0]


@pytest.mark.slow  # trains three times, in fresh processes
def test_a_failing_run_is_recorded_and_the_others_still_run_and_resume_retries_it(tmp_path, task_files, capsys):
    args = compare_args(tmp_path, task_files, ["lora", "loreft"], "--method-args", "lora=--lr 1e30")
    code, printed, err = run_compare(args, capsys)
    assert code == 1
    assert "lora failed: TrainingDiverged: training stopped: the loss" in printed  # the note under the table
    rows = {row[0]: row for row in table_lines(printed)[1:]}
    assert rows["lora"][-2:] == ["failed", "lora --lr 1e30"] and rows["lora"][1] == "0/1" and rows["lora"][2] == "-"
    assert rows["loreft"][-2:] == ["finished", "loreft"]
    saved = json.loads((tmp_path / "comparison.json").read_text())
    lora, loreft = saved["runs"]
    assert lora["result"] is None and lora["error"].startswith("TrainingDiverged")
    assert loreft["error"] is None and loreft["result"]["trainable_params"] > 0
    # --resume with a saner lr: the failed run (which has nothing to keep) starts again, the finished one is reused.
    code, printed, _ = run_compare(compare_args(tmp_path, task_files, ["lora", "loreft"], "--resume", "--in-process"),
                                   capsys)
    assert code == 0 and "loreft/seed-11711: finished earlier" in printed and "lora/seed-11711: finished" not in printed
    again = json.loads((tmp_path / "comparison.json").read_text())["runs"]
    assert again[0]["result"]["stopped"] == "finished" and again[1] == loreft


def test_a_part_flag_goes_to_the_variants_with_that_part(tmp_path, task_files):
    _, runs = parse_command(compare_args(tmp_path, task_files, ["lora", "loreft", "lora+loreft",
                                                                "r4=lora+loreft --lora.rank 4"],
                                         "--rank", "2", "--loreft.positions", "l1"))
    by = {r.variant.name: r.config for r in runs}
    assert by["lora"].method == MethodConfig("lora", rank=2)
    assert by["loreft"].method == MethodConfig("loreft", rank=2, positions="l1")
    assert by["lora+loreft"].method == [MethodConfig("lora", rank=2),
                                        MethodConfig("loreft", rank=2, positions="l1", name="loreft")]
    assert by["r4"].method[0] == MethodConfig("lora", rank=4) and by["r4"].method[1] == by["lora+loreft"].method[1]
    assert by["lora+loreft"].run_dir == tmp_path / "lora+loreft" / "seed-11711"


@pytest.mark.slow  # two runs
def test_a_combination_gets_its_own_row(tmp_path, task_files, capsys):
    code, printed, err = run_compare(compare_args(tmp_path, task_files, ["loreft", "lora+loreft"], "--in-process"), capsys)
    assert code == 0, err
    header, *rows = table_lines(printed)
    rows = {row[0]: dict(zip(header, row)) for row in rows}
    saved = {run["variant"]: run for run in json.loads((tmp_path / "comparison.json").read_text())["runs"]}
    lora = 2 * 2 * 2 * (8 * 64)  # tiny: 2 layers, d 64, rank 8 on query and value
    combined, alone = saved["lora+loreft"]["result"], saved["loreft"]["result"]
    assert combined["method_name"] == "lora+loreft" and [m["method"] for m in combined["method"]] == ["lora", "loreft"]
    assert combined["trainable_params"] == alone["trainable_params"] + lora
    assert rows["lora+loreft"]["trainable params"] == f"{combined['trainable_params']:,}"
    assert rows["lora+loreft"]["status"] == "finished"
    assert (tmp_path / "lora+loreft" / "seed-11711" / "predictions" / "lora+loreft-sst-dev-out.csv").is_file()


def test_weight_update_methods_get_their_own_flags(tmp_path, task_files):
    _, runs = parse_command(compare_args(tmp_path, task_files, ["lora", "dora", "ia3"], "--lora-targets", "c_attn",
                                         "--ia3-targets", "c_attn,ffn", "--rank", "2"))
    by = {r.variant.name: r.config for r in runs}
    assert by["lora"].method == MethodConfig("lora", rank=2, targets=("c_attn",))
    assert by["dora"].method == MethodConfig("dora", rank=2, targets=("c_attn",))
    assert by["ia3"].method == MethodConfig("ia3", ia3_targets=("c_attn", "ffn"))
    assert by["ia3"].learning_rate == 3e-3


@pytest.mark.slow  # trains three methods
def test_weight_update_methods_compare_in_one_table(tmp_path, task_files, capsys):
    code, printed, err = run_compare(compare_args(tmp_path, task_files, ["lora", "dora", "ia3"], "--in-process",
                                                  "--lora-targets", "c_attn"), capsys)
    assert code == 0, err
    header, *rows = table_lines(printed)
    rows = {row[0]: dict(zip(header, row)) for row in rows}
    assert list(rows) == ["lora", "dora", "ia3"] and all(row["status"] == "finished" for row in rows.values())
    counts = {name: int(row["trainable params"].replace(",", "")) for name, row in rows.items()}
    # dora is lora plus one magnitude per output feature of c_attn (3 x 64 in each of 2 layers)
    assert counts["dora"] - counts["lora"] == 2 * 3 * 64 and counts["ia3"] < counts["lora"]


@pytest.mark.slow  # trains four methods
def test_the_reft_family_compares_in_one_table(tmp_path, task_files, capsys):
    code, printed, err = run_compare(compare_args(tmp_path, task_files, ["consreft", "lobireft", "direft", "nodireft"],
                                                  "--in-process", "--rank", "2"), capsys)
    assert code == 0, err
    header, *rows = table_lines(printed)
    rows = {row[0]: dict(zip(header, row)) for row in rows}
    assert list(rows) == ["consreft", "lobireft", "direft", "nodireft"]
    assert all(row["status"] == "finished" for row in rows.values())
    counts = {name: int(row["trainable params"].replace(",", "")) for name, row in rows.items()}
    # Per layer (2) and tied position set, at width 64 and rank 2: R (2 x 64) and b (2); W (2 x 64) as well for
    # the linear sources (direft's R orthonormal, nodireft's free: the same count). The head (5 x 64 + 5) trains too.
    head = 5 * 64 + 5
    assert counts["consreft"] == counts["lobireft"] == 2 * (2 * 64 + 2) + head
    assert counts["direft"] == counts["nodireft"] == 2 * (2 * 2 * 64 + 2) + head


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("variants, extra, message", [
    (["lora", "nope"], [], "argument --variants: variant 'nope': unknown method 'nope'"),
    (["lora", "lora"], [], "each variant needs its own name: lora given more than once"),
    (["loreft:late", "loreft-late=loreft --rank 2"], [],
     "each variant needs its own run directory: loreft:late and loreft-late would both write loreft-late/"),
    (["lora --rank 2"], [], "needs a name"),
    ([], ["--methods", "lora,lora"], "list each method once"),
    ([], ["--methods", "lora,nope"], "argument --methods: unknown method 'nope'"),
    (["lora", "full+lora"], [], "argument --variants: variant 'full+lora': full+lora: full cannot be combined"),
    ([], ["--methods", "lora,full+lora"], "argument --methods: full+lora: full cannot be combined with other methods"),
    (["lora", "lora+loreft"], ["--noreft.rank", "1"], "--noreft.rank applies to none of the methods lora,lora+loreft"),
    (["full", "loreft"], ["--lora-targets", "query"], "--lora-targets applies to none of the methods full,loreft"),
    (["lora", "loreft"], ["--method-args", "lora=--epochs 3"], "every variant must share epochs"),
    (["lora", "r2=lora --seed 3"], [], "every variant must share seed"),
    (["lora", "loreft"], ["--method-args", "bitfit=--lr 1"], "for one of the variants"),
    (["lora"], ["--baseline", "loreft"], "--baseline 'loreft' is none of the variants"),
    (["lora"], ["--seeds", "0"], "argument --seeds: must be a count >= 1"),
    (["lora"], ["--budget-steps", "4", "--budget-seconds", "9"], "not allowed with argument --budget-steps"),
    (["lora"], ["--method", "lora"], "--method is set by compare.py"),
    (["lora"], ["--predictions-dir", "elsewhere"], "--predictions-dir is set by compare.py"),
    (["lora"], ["--epochs", "-1"], "compare.py: error: argument --epochs: must be a positive integer"),
    (["lora", "loreft"], ["--data-dir", "nowhere"], "ids-sst-train.csv: directory does not exist"),
    (["x=lora --layers auto:0"], [], "x: --layers must be layer indices or auto:K with K >= 1"),
])
def test_bad_command_lines_fail_before_training(tmp_path, task_files, capsys, variants, extra, message):
    err = refused(compare_args(tmp_path, task_files, variants, *extra), capsys)
    assert message in err and "--variants" in err  # compare's own usage, whichever flag was wrong
    assert not any(tmp_path.iterdir())


def test_human_formatting():
    assert (human_bytes(500), human_bytes(289 * 1024 + 100), human_bytes(1.2 * 2**30)) == ("500 B", "289 KiB", "1.2 GiB")
    assert [human_percent(p) for p in (100.0, 0.0595, 0.0021, 0.04, 0, 1e-5)] == \
        ["100.0%", "0.059%", "0.0021%", "0.040%", "0%", "0.000010%"]
    assert [human_number(x) for x in (1234.4, 0.3123, 42.04, 2.0, 9.999, 99.96, 0)] == \
        ["1,234", "0.312", "42.0", "2.00", "10.0", "100", "0"]
    assert human_number(float("nan")) == "nan" and human_number(-0.00123) == "-0.00123"
