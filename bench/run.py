"""The benchmark: ours against transformers / peft / pyreft, on the same weights and inputs, in one run.

    python bench/run.py                      # everything (about 15-30 minutes on 2 cores)
    python bench/run.py --quick              # fewer repeats, no SST epochs: about 10 minutes
    python bench/run.py --only forward,generate --repeats 7

Each comparison runs in two long-lived workers, bench/ours.py (this venv) and bench/peers.py
(bench/.venv-peers, see bench/README.md), each set up once (model built, warmup steps), then timed
alternately step by step, ours then peer, so that load from elsewhere on the machine hits both alike.
Figures are medians over the repeats. Results merge into bench/results.json (each figure carries the
date it was measured) and bench/RESULTS.md is rewritten from it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import time
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))  # the project itself (data.atomic, models, ...)

import common  # noqa: E402
import report  # noqa: E402

GROUPS = ("peak", "forward", "step", "generate", "sst", "sst-run")
DEFAULT_PEERS_PYTHON = BENCH / ".venv-peers" / "bin" / "python"
SST_METHODS = ("full", "lora", "reft", "loreft")
# Training-step cases, each against its peer with the same settings: lora (ours on query,key,value, peft on c_attn),
# then like for like with peft on the fused c_attn: lora_c_attn, dora (both rank 8) and ia3 (peft's GPT-2 targets).
# The soft prompts (prompt, ptuning with an MLP encoder as wide as the model, prefix) with 20 virtual tokens each.
STEP_METHODS = ("full", "lora", "lora_c_attn", "dora", "ia3", "prompt", "ptuning", "prefix", *common.REFT_INTERVENTIONS)
# Options beyond each method's defaults, matching the training-step benchmark: LoReFT rank 4 on all 12 layers
# at the last position (its default, f1+l1, also edits the first token).
SST_METHOD_FLAGS = {"loreft": ["--positions", "l1"]}
# The multi-epoch SST runs (group sst-run): name -> train_sentiment.py's method flags. Epochs after the first show
# what the frozen-part cache saves (tasks/feature_cache.py): the head alone for last-linear-layer, the top four
# layers for loreft-top4, the last token for last-position LoReFT; full fine-tuning and LoRA on every layer
# cache nothing.
SST_RUNS = {
    "full": ["--method", "full"],
    "last-linear-layer": ["--method", "last-linear-layer"],
    "lora": ["--method", "lora"],
    "loreft": ["--method", "loreft", "--positions", "l1"],
    "loreft-top4": ["--method", "loreft", "--layers", "8,9,10,11"],
}
SST_RUN_EPOCHS = 3


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have spent so far (user + nice + system + irq + softirq +
    steal), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a running process (fields 14 and 15 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """Mean number of cores that processes other than ours kept busy between start() and stop()."""

    def __init__(self, workers):
        self.pids = [os.getpid()] + [w.process.pid for w in workers if w is not None]

    def ours(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.pids)

    def __enter__(self):
        self.start = (time.monotonic(), machine_busy_seconds(), self.ours())
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.start[0]
        others = (machine_busy_seconds() - self.start[1]) - (self.ours() - self.start[2])
        self.other_cores = round(max(others, 0.0) / max(wall, 1e-9), 2)


def own_cpu_seconds() -> float:
    """CPU seconds of this process and of its reaped children (the workers, the SST runs)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class WorkerError(RuntimeError):
    pass


class Worker:
    """A bench/ours.py or bench/peers.py process answering one JSON request per line."""

    def __init__(self, name: str, python: str, script: Path, threads: int, log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.log = open(self.log_path, "a")  # a restarted worker appends
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
                   TOKENIZERS_PARALLELISM="false")
        self.process = subprocess.Popen(
            [python, str(script), "--worker", "--threads", str(threads)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1, cwd=ROOT, env=env,
        )

    def request(self, **payload) -> dict:
        try:
            self.process.stdin.write(json.dumps(payload) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise WorkerError(f"{self.name} worker exited (code {self.process.poll()}); see {self.log_path}:\n"
                              + self.log_tail())
        answer = json.loads(line)
        if not answer.get("ok"):
            raise WorkerError(f"{self.name} worker failed on {payload.get('case') or payload.get('name')}:\n"
                              + answer.get("error", "?"))
        return answer

    def log_tail(self, lines: int = 15) -> str:
        self.log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.flush()
                self.process.wait(timeout=60)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        self.log.close()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def summarize(runs: list[dict]) -> dict:
    rates = [run["units"] / run["seconds"] for run in runs]
    return {
        "units_per_s_median": statistics.median(rates),
        "units_per_s_best": max(rates),
        "seconds": [round(run["seconds"], 4) for run in runs],
        "units_per_step": runs[0]["units"],
    }


# ---------------------------------------------------------------------------------------- comparisons
def precisions_for(best: str) -> tuple[str, ...]:
    """The precisions worth measuring on a machine whose `--precision auto` is `best`: bf16 only where the CPU runs
    it natively (emulated, a bf16 matmul runs ~100x slower than fp32, a figure no user should take)."""
    return ("fp32", "bf16") if best == "bf16" else ("fp32",)


def comparisons(weights: str, groups: set[str], best: str = "bf16", step_methods=STEP_METHODS) -> list[dict]:
    """Pairs measured side by side: a name, the group, and (case, options) for ours and for the peer. Training
    steps run at the machine's best precision `best`, on both sides."""
    pairs = []
    if "forward" in groups:
        for precision in precisions_for(best):
            options = {"weights": weights, "precision": precision}
            pairs.append({"name": f"forward_{precision}", "group": "forward", "unit": "tokens",
                          "ours": ("forward", options), "peer": ("forward", options)})
    if "step" in groups:
        for method in step_methods:
            options = {"weights": weights, "method": method, "precision": best}
            pairs.append({"name": f"step_{method}", "group": "step", "unit": "tokens",
                          "ours": ("train_step", options), "peer": ("train_step", options)})
    if "generate" in groups:
        # The peer at its faster precision is the bar: at batch 1 transformers is often faster in fp32
        # than under autocast, which re-casts every weight at every step.
        for batch in (1, 8):
            for precision in precisions_for(best):
                options = {"weights": weights, "precision": precision, "batch": batch}
                pairs.append({"name": f"generate_b{batch}_{precision}", "group": "generate", "unit": "new tokens",
                              "ours": ("generate", options), "peer": ("generate", options)})
    return pairs


def measure_pair(pair: dict, ours: Worker, peer: Worker | None, repeats: int, warmup: int) -> dict:
    sides = {"ours": ours} if peer is None else {"ours": ours, "peer": peer}
    result = {"measured_at": now(), "unit": pair["unit"], "group": pair["group"], "repeats": repeats, "warmup": warmup}
    active = {}
    for side, worker in sides.items():
        case, options = pair[side]
        try:
            answer = worker.request(op="setup", case=case, options=options, warmup=warmup)
            result[side] = {"info": answer["info"], "worker_peak_rss_bytes": answer["peak_rss_bytes"]}
            active[side] = worker
        except WorkerError as error:
            result[side] = {"error": str(error)}
            print(f"  {pair['name']}: {side} failed:\n{error}", file=sys.stderr)
    runs = {side: [] for side in active}
    with LoadMeter(active.values()) as load:
        for _ in range(repeats):
            for side, worker in active.items():  # alternate ours, peer, ours, peer...
                runs[side].append(worker.request(op="run"))
    result["other_processes_mean_cores"] = load.other_cores
    for side in active:
        result[side].update(summarize(runs[side]))
    line = ", ".join(f"{side} {result[side]['units_per_s_median']:.1f}" for side in active)
    print(f"  {pair['name']}: {line} {pair['unit']}/s (median of {repeats}; other processes used "
          f"{load.other_cores} cores)", flush=True)
    return result


# ---------------------------------------------------------------------------------------- SST epochs
def sst_epoch(method: str, weights: str, data_dir: Path, tokenizer: Path, work: Path, threads: int,
              max_examples: int | None = None) -> dict:
    """One SST training epoch through the project's own training script, in a fresh process so that its
    peak memory is the method's own."""
    result = train_sentiment(f"sst-{method}", ["--method", method, *SST_METHOD_FLAGS.get(method, [])], 1, weights,
                             data_dir, tokenizer, work, threads, max_examples)
    if "log" in result:
        result.update(epoch_seconds_from_log(result.pop("log")))
    return result


def sst_run(name: str, weights: str, data_dir: Path, tokenizer: Path, work: Path, threads: int,
            max_examples: int | None = None, epochs: int = SST_RUN_EPOCHS) -> dict:
    """A multi-epoch SST run (SST_RUNS[name]) through the training script: each epoch's training seconds, the
    whole run's, and what the frozen-part cache held (from the run's log.json)."""
    result = train_sentiment(f"sst-run-{name}", SST_RUNS[name], epochs, weights, data_dir, tokenizer, work, threads,
                             max_examples)
    log = result.pop("log", None)
    if log is None:
        return result
    try:
        content = json.loads(log.read_text())
        result["epoch_seconds"] = [entry["train_seconds"] for entry in content["epochs"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        result["log_error"] = f"{log}: {error}"
        return result
    result["run_seconds"] = sum(result["epoch_seconds"])
    result["precision"] = content.get("precision")
    result["cache"] = content.get("cache")
    return result


def train_sentiment(name: str, method_flags: list[str], epochs: int, weights: str, data_dir: Path, tokenizer: Path,
                    work: Path, threads: int, max_examples: int | None) -> dict:
    """Runs train_sentiment.py on SST in a fresh process at the machine's best precision (--precision auto);
    returns the wall seconds, the peak RSS, the command and the path of its log.json (under "log"), or an error."""
    script = ROOT / "train_sentiment.py"
    if not script.is_file():
        return {"not_measured": "train_sentiment.py (the task training code) is not in the repository yet"}
    if not (data_dir / "ids-sst-train.csv").is_file():
        return {"not_measured": f"SST data not found in {data_dir}"}
    output_dir = work / name
    command = [
        sys.executable, str(script), "--task", "sst", "--model", weights, "--tokenizer", str(tokenizer),
        "--data-dir", str(data_dir), "--output-dir", str(output_dir), "--predictions-dir", str(work / "predictions"),
        *method_flags, "--epochs", str(epochs), "--precision", "auto", "--max-eval-examples", "64", "--seed", "0",
        "--threads", str(threads), "--overwrite",
    ] + (["--max-train-examples", str(max_examples)] if max_examples else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    log_path = work / f"{name}.log"
    start = datetime.datetime.now()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
    wall = (datetime.datetime.now() - start).total_seconds()
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        return {"error": f"train_sentiment.py exited with {os.waitstatus_to_exitcode(status)}:\n{tail}",
                "command": " ".join(command)}
    saved = work / f"{name}-log.json"  # the run directory goes (checkpoints of a random model), its log stays
    shutil.copyfile(output_dir / "log.json", saved)
    shutil.rmtree(output_dir, ignore_errors=True)
    return {"wall_seconds": wall, "peak_rss_bytes": usage.ru_maxrss * 1024, "command": " ".join(command),
            "measured_at": now(), "train_examples": max_examples or "all", "log": saved}


def epoch_seconds_from_log(path: Path) -> dict:
    """The training seconds of epoch 1 from the trainer's JSON log (whichever name it gives them)."""
    try:
        log = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        return {"epoch_seconds": None, "log_error": f"{path}: {error}"}
    epochs = log.get("epochs", log) if isinstance(log, dict) else log
    first = epochs[0] if isinstance(epochs, list) and epochs else {}
    for key in ("train_seconds", "epoch_seconds", "seconds"):
        if isinstance(first, dict) and isinstance(first.get(key), (int, float)):
            return {"epoch_seconds": first[key], "epoch_seconds_key": key,
                    "tokens_per_s": first.get("train_tokens_per_second") or first.get("tokens_per_s")}
    return {"epoch_seconds": None, "log_error": f"{path}: no per-epoch seconds found"}


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help=f"comma-separated groups among {', '.join(GROUPS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="3 repeats, 1 warmup step, no SST epochs unless --only asks")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per side (default 7, --quick 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after setup (default 2, --quick 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides (default 2)")
    parser.add_argument("--peers-python", default=str(DEFAULT_PEERS_PYTHON), help="python of the peers' venv")
    parser.add_argument("--no-peers", action="store_true", help="measure ours only: replaces the figures it measures, without peer figures or ratios")
    parser.add_argument("--sst-methods", default=",".join(SST_METHODS), help="methods for the SST epochs")
    parser.add_argument("--sst-runs", default=",".join(SST_RUNS),
                        help=f"the multi-epoch SST runs of group sst-run, among {', '.join(SST_RUNS)}")
    parser.add_argument("--sst-run-epochs", type=int, default=SST_RUN_EPOCHS, help="epochs of each sst-run run")
    parser.add_argument("--step-methods", default=",".join(STEP_METHODS),
                        help=f"training-step cases (default: all of {', '.join(STEP_METHODS)})")
    parser.add_argument("--sst-examples", type=int, default=None,
                        help="train the SST epochs on the first N sentences only (a smoke test: such partial "
                        "epochs are reported but not held against the target)")
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"), help="where ids-sst-train.csv is")
    parser.add_argument("--tokenizer", default=str(ROOT.parent / "shared" / "gpt2-tokenizer"),
                        help="directory with vocab.json + merges.txt, for the SST epochs")
    parser.add_argument("--results", default=str(BENCH / "results.json"), help="merged into if it exists")
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: rewrite RESULTS.md and the derived figures of results.json from its raw ones")
    parser.add_argument("--fresh", action="store_true", help="start results.json afresh instead of merging")
    args = parser.parse_args(argv)
    if args.only:
        groups = {g.strip() for g in args.only.split(",") if g.strip()}
        unknown = groups - set(GROUPS)
        if unknown:
            parser.error(f"--only: unknown groups {sorted(unknown)}; choose among {', '.join(GROUPS)}")
    else:
        groups = set(GROUPS) - ({"sst", "sst-run"} if args.quick else set())
    args.groups = groups
    args.step_methods = [m.strip() for m in args.step_methods.split(",") if m.strip()]
    unknown = sorted(set(args.step_methods) - set(STEP_METHODS))
    if unknown:
        parser.error(f"--step-methods: unknown cases {unknown}; choose among {', '.join(STEP_METHODS)}")
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1 or args.sst_run_epochs < 1:
        parser.error("--repeats, --threads and --sst-run-epochs must be >= 1, --warmup >= 0")
    args.sst_runs = [name.strip() for name in args.sst_runs.split(",") if name.strip()]
    unknown = sorted(set(args.sst_runs) - set(SST_RUNS))
    if unknown:
        parser.error(f"--sst-runs: unknown runs {unknown}; choose among {', '.join(SST_RUNS)}")
    if not (args.no_peers or args.report_only) and groups - {"peak", "sst", "sst-run"} \
            and not Path(args.peers_python).exists():
        parser.error(f"--peers-python {args.peers_python} does not exist: set up the peers' venv as bench/README.md "
                     "says, or pass --no-peers")
    return args


def load_results(path: Path, fresh: bool) -> dict:
    if fresh or not path.is_file():
        return {"figures": {}, "sst": {}, "sst_run": {}}
    results = json.loads(path.read_text())
    for key in ("figures", "sst", "sst_run"):
        results.setdefault(key, {})
    return results


def main(argv=None) -> None:
    args = parse_args(argv)
    results_path = Path(args.results)
    results = load_results(results_path, args.fresh)
    if args.report_only:
        return write_report(results, results_path)
    work = Path(tempfile.mkdtemp(prefix="gpt2-bench-"))
    weights = str(work / "weights")
    print(f"bench: groups {', '.join(sorted(args.groups))}; {args.repeats} repeats, {args.warmup} warmup, "
          f"{args.threads} threads; logs in {work}", flush=True)
    ours = Worker("ours", sys.executable, BENCH / "ours.py", args.threads, work)
    peer = None
    try:
        results["machine"] = ours.request(op="call", name="machine")["result"]
        best = results["machine"]["best_precision"] = ours.request(op="call", name="best_precision")["result"]
        note_skipped_precisions(results, best)
        results["settings"] = {
            "repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
            "forward_shape": common.FORWARD_SHAPE, "step_shape": common.STEP_SHAPE,
            "prompt_length": common.PROMPT_LENGTH, "new_tokens": common.NEW_TOKENS, "seed": common.SEED,
            "weights": "random gpt2-shaped weights (124M), exported by ours and loaded by both sides",
        }
        results.setdefault("versions", {})["ours"] = {"torch": results["machine"]["torch"]}
        need_weights = args.groups & {"forward", "step", "generate", "sst", "sst-run"}
        if need_weights:
            ours.request(op="call", name="export_weights", options={"directory": weights})
        if not args.no_peers and args.groups - {"peak", "sst", "sst-run"}:
            peer = Worker("peers", args.peers_python, BENCH / "peers.py", args.threads, work)
            results["versions"]["peers"] = peer.request(op="call", name="versions")["result"]
        peaks = []
        if args.groups & {"peak", "forward"}:  # MFU needs the peak of this same run
            peaks.append(measure_peak(ours, best))
        for pair in comparisons(weights, args.groups, best, args.step_methods):
            try:
                results["figures"][pair["name"]] = measure_pair(pair, ours, peer, args.repeats, args.warmup)
            except WorkerError as error:  # a worker died: record it, restart it for the next pair
                print(f"  {pair['name']}: {error}", file=sys.stderr)
                results["figures"][pair["name"]] = {"error": str(error), "measured_at": now()}
                ours, peer = restart(ours, peer, args, work)
        if peaks:
            peaks.append(measure_peak(ours, best))  # before and after: the best is the machine's ceiling
            results["matmul_peak"] = {
                dtype: max((p[dtype] for p in peaks), key=lambda r: r["flops_per_s"]) for dtype in precisions_for(best)
            }
            results["matmul_peak"]["measured_at"] = now()
            results["memory_bandwidth"] = max((p["bandwidth"] for p in peaks), key=lambda r: r["bytes_per_s"])
            results["gemv_stream"] = max((p["gemv"] for p in peaks), key=lambda r: r["bytes_per_s"])
    finally:
        ours.close()
        if peer is not None:
            peer.close()
    if "sst" in args.groups:
        for method in (m.strip() for m in args.sst_methods.split(",") if m.strip()):
            print(f"  sst epoch, {method} ...", flush=True)
            before = (time.monotonic(), machine_busy_seconds(), own_cpu_seconds())
            results["sst"][method] = sst_epoch(method, weights, Path(args.data_dir), Path(args.tokenizer), work,
                                               args.threads, args.sst_examples)
            wall = time.monotonic() - before[0]  # the run is a reaped child: its CPU time is in RUSAGE_CHILDREN
            others = (machine_busy_seconds() - before[1]) - (own_cpu_seconds() - before[2])
            results["sst"][method]["other_processes_mean_cores"] = round(max(others, 0.0) / wall, 2)
            print(f"  sst epoch, {method}: {report.describe_sst(results['sst'][method])}", flush=True)
            report.write_json(results, results_path)  # each long run kept as it ends: an interruption loses one
    if "sst-run" in args.groups:
        measure_sst_runs(results, args, weights, work, lambda: report.write_json(results, results_path))
    shutil.rmtree(work / "weights", ignore_errors=True)  # 500 MB; the logs stay for a post-mortem
    write_report(results, results_path)


def measure_sst_runs(results: dict, args, weights: str, work: Path, save) -> None:
    """Each run of --sst-runs in turn; `save()` after each, so that an interrupted bench keeps the runs it ended
    (`--report-only` then writes RESULTS.md from them)."""
    for name in args.sst_runs:
        print(f"  sst run, {name} ({args.sst_run_epochs} epochs) ...", flush=True)
        before = (time.monotonic(), machine_busy_seconds(), own_cpu_seconds())
        entry = sst_run(name, weights, Path(args.data_dir), Path(args.tokenizer), work, args.threads,
                        args.sst_examples, args.sst_run_epochs)
        wall = time.monotonic() - before[0]
        others = (machine_busy_seconds() - before[1]) - (own_cpu_seconds() - before[2])
        entry["other_processes_mean_cores"] = round(max(others, 0.0) / wall, 2)
        results["sst_run"][name] = entry
        print(f"  sst run, {name}: {report.describe_sst_run(entry)}", flush=True)
        save()


def write_report(results: dict, results_path: Path) -> None:
    report.derive(results)
    report.write_json(results, results_path)
    report.write_markdown(results, results_path.with_name("RESULTS.md"))
    print(report.summary(results))
    print(f"wrote {results_path} and {results_path.with_name('RESULTS.md')}")


def measure_peak(ours: Worker, best: str = "bf16") -> dict:
    """The GEMM peak of each precision worth measuring here, the copy bandwidth, and the rate matrix-vector
    products stream weights in the best precision (what batch-1 decoding runs at)."""
    names = {"bf16": "bfloat16", "fp32": "float32"}
    peaks = {dtype: ours.request(op="call", name="matmul_peak", options={"dtype": names[dtype]})["result"]
             for dtype in precisions_for(best)}
    peaks["bandwidth"] = ours.request(op="call", name="memory_bandwidth")["result"]
    peaks["gemv"] = ours.request(op="call", name="gemv_stream", options={"dtype_name": names[best]})["result"]
    gemm = ", ".join(f"{dtype} {peaks[dtype]['flops_per_s'] / 1e9:.0f}" for dtype in precisions_for(best))
    print(f"  matmul peak: {gemm} GFLOP/s; copy bandwidth {peaks['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s; {best} "
          f"gemv streams {peaks['gemv']['bytes_per_s'] / 1e9:.1f} GB/s", flush=True)
    return peaks


def note_skipped_precisions(results: dict, best: str) -> None:
    """Where bf16 is emulated, its figures (kept from a run on another machine, say) go, with a note saying why."""
    if best == "bf16":
        results.pop("skipped", None)
        return
    results["skipped"] = {"bf16": "this CPU has no bf16 instructions (oneDNN emulates bf16, many times slower than "
                                  "fp32), so --precision auto trains in fp32 here and the bench measures fp32 only"}
    for name in [n for n in results["figures"] if n.endswith("_bf16")]:
        del results["figures"][name]
    results.get("matmul_peak", {}).pop("bf16", None)


def restart(ours: Worker, peer: Worker | None, args, work: Path):
    ours.close()
    if peer is not None:
        peer.close()
    ours = Worker("ours", sys.executable, BENCH / "ours.py", args.threads, work)
    peer = None if peer is None else Worker("peers", args.peers_python, BENCH / "peers.py", args.threads, work)
    return ours, peer


if __name__ == "__main__":
    main()
