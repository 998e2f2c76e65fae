"""The shared training loop: schedule, gradient accumulation, checkpoints and resuming, the NaN stop, early
stopping, the best checkpoint, the log and the RunResult compare.py reads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from models.tokenizer import GPT2Tokenizer
from tasks import get_task
from tasks.checkpoint import ResumeError, checkpoint_path
from tasks.cli import parse_args
from tasks.distributed import Distributed
from tasks.config import TrainConfig
from tasks.trainer import (
    Trainer,
    TrainingDiverged,
    run_training,
    warmup_then_decay,
)
from tests.fixtures.task_files import base_args, run_script

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]
TIMING_FIELDS = ("train_seconds", "train_tokens_per_second", "dev_seconds")


def config_for(tmp_path, task_files, task="sst", **overrides):
    return parse_args(task, base_args(tmp_path, task_files, **overrides))


def trained_tensors(run_dir):
    return torch.load(checkpoint_path(run_dir), weights_only=True)["trainable"]


def without_timings(history):
    return [{k: v for k, v in entry.items() if k not in TIMING_FIELDS} for entry in history]


# ----------------------------------------------------------------------------------------------- schedule
def test_warmup_then_linear_decay():
    factor = warmup_then_decay(total_steps=10, warmup_steps=4)
    values = [factor(step) for step in range(10)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4:] == pytest.approx([1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    assert warmup_then_decay(5, 0)(0) == 1.0 and warmup_then_decay(5, 0)(4) == pytest.approx(0.2)


# ----------------------------------------------------------------------------------------------- steps
def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch(tmp_path, task_files):
    """The loss is normalised by the terms of the whole optimizer step, so micro-batches of 3 + 3 or 1 + 5
    accumulate the gradient of one batch of 6 (compared before the optimizer, which would amplify rounding
    noise in gradients that are zero in exact arithmetic)."""
    gradients = []
    for name, group in (("one", [[0, 1, 2, 3, 4, 5]]), ("two", [[0, 1, 2], [3, 4, 5]]), ("odd", [[0], [1, 2, 3, 4, 5]])):
        config = config_for(tmp_path / name, task_files, max_grad_norm=0)
        trainer = Trainer(get_task("sst"), config, Distributed(), torch.device("cpu"))
        trainer.setup()
        trainer.model.train()
        named = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
        trainer.optimizer.step = lambda: gradients.append({n: p.grad.clone() for n, p in named})
        with pytest.warns(UserWarning, match="lr_scheduler.step"):  # the optimizer step was replaced
            trainer.train_step(group, trainer.splits["train"])
    assert len(gradients) == 3
    for other in gradients[1:]:
        for name, tensor in gradients[0].items():
            torch.testing.assert_close(other[name], tensor, rtol=1e-4, atol=1e-7)


def test_bf16_stores_the_frozen_base_in_bf16_and_trains_in_fp32(tmp_path, task_files):
    config = config_for(tmp_path, task_files, precision="bf16", method="lora", epochs=1, max_train_examples=8)
    trainer = Trainer(get_task("sst"), config, Distributed(), torch.device("cpu"))
    trainer.setup()
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    frozen = [m.weight for m in trainer.gpt.modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    assert frozen and all(w.dtype == torch.bfloat16 for w in frozen if not w.requires_grad)
    assert trainer.gpt.wte.weight.dtype == torch.bfloat16
    trainer.model.train()
    trainer.train_step([[0, 1, 2, 3]], trainer.splits["train"])
    states = [trainer.optimizer.state[p] for p in trainable]
    assert all(s["exp_avg"].dtype == torch.float32 and s["exp_avg_sq"].dtype == torch.float32 for s in states)


# ----------------------------------------------------------------------------------------------- a whole run
def test_run_writes_log_best_adapter_predictions_and_reports_what_compare_needs(tmp_path, task_files):
    config = config_for(tmp_path, task_files, method="lora", epochs=2)
    result = run_training("sst", config)
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["status"] == "finished" and [e["epoch"] for e in log["epochs"]] == [1, 2]
    for entry in log["epochs"]:
        assert {"train_loss", "train_seconds", "train_tokens_per_second", "lr", "dev"} <= set(entry)
        assert set(entry["dev"]) == {"accuracy", "macro_f1"}
    assert log["config"]["method"]["method"] == "lora" and log["parameters"]["trainable"] == result.trainable_params
    assert "temperature" not in log["config"] and "temperature" in TrainConfig("sonnet").to_dict()  # sonnet's only
    # Every training example is seen once per epoch: the epoch's real tokens are the training set's.
    train = get_task("sst").load(config, GPT2Tokenizer.from_pretrained(task_files.tokenizer), 1024).splits["train"]
    assert [e["train_tokens"] for e in log["epochs"]] == [sum(x.length for x in train)] * 2
    assert (tmp_path / "run" / "best" / "adapter.safetensors").is_file()
    assert result.stopped == "finished" and result.metric == "accuracy" and len(result.epoch_seconds) == 2
    assert 0 < result.trainable_params < result.total_params
    assert result.adapter_bytes > 4 * result.trainable_params  # fp32 tensors + the JSON config
    assert result.train_tokens_per_second > 0 and result.peak_memory_bytes > 0
    assert result.inference_seconds_per_example > 0
    assert (log["final"]["peak_memory_bytes"], log["final"]["inference_seconds_per_example"]) == \
        (result.peak_memory_bytes, result.inference_seconds_per_example)
    assert result.best_dev_metric == result.dev_metrics["accuracy"]
    assert (tmp_path / "predictions" / "lora-sst-dev-out.csv").is_file()
    assert json.loads(json.dumps(result.to_dict()))["task"] == "sst"


@pytest.mark.slow  # 768 MiB of ballast
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak RSS")
def test_peak_memory_is_the_runs_own_not_the_processes(tmp_path, task_files):
    """compare.py runs several methods in one process: an earlier, larger peak must not leak into a run."""
    ballast = b"\x01" * (768 * 2**20)  # written, so resident: the process's peak RSS grows by 768 MiB
    del ballast
    process_peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024
    result = run_training("sst", config_for(tmp_path, task_files, max_train_examples=4))
    assert 0 < result.peak_memory_bytes < process_peak - 256 * 2**20


@pytest.mark.slow  # three epochs
def test_final_predictions_come_from_the_best_checkpoint(tmp_path, task_files, monkeypatch):
    """The dev metric is made to get worse every epoch, so epoch 1 is the best: the final predictions must be
    made with epoch 1's weights, not the last ones."""
    task = get_task("sst")
    calls, seen = [], []
    real_metrics, real_predict = task.metrics, task.predict

    def worse_each_epoch(examples, predictions):
        calls.append(1)
        return {**real_metrics(examples, predictions), "accuracy": 1.0 / len(calls)}

    def recording_predict(model, examples, *args, **kwargs):
        seen.append(model.head.weight.detach().clone())
        return real_predict(model, examples, *args, **kwargs)

    monkeypatch.setattr(task, "metrics", worse_each_epoch)
    monkeypatch.setattr(task, "predict", recording_predict)
    config = config_for(tmp_path, task_files, epochs=3, lr=1e-2)
    result = run_training(task, config)
    assert result.best_epoch == 1 and [e["best"] for e in result.epochs] == [True, False, False]
    best = load_file(tmp_path / "run" / "best" / "adapter.safetensors")["head.weight"]
    last = trained_tensors(tmp_path / "run")["head.weight"]
    assert not torch.equal(best, last)
    assert torch.equal(seen[0], best)  # epoch 1's evaluation
    assert torch.equal(seen[-1], best) and torch.equal(seen[-2], best)  # final dev and test predictions


@pytest.mark.slow  # three epochs
def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path, task_files, monkeypatch):
    task = get_task("sst")
    monkeypatch.setattr(task, "metrics", lambda examples, predictions: {"accuracy": 0.5, "macro_f1": 0.1})
    code, out, _ = run_script_with(task, monkeypatch, base_args(tmp_path, task_files, epochs=6, patience=2))
    assert code == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["status"] == "early stopping" and len(log["epochs"]) == 3 and log["best_epoch"] == 1
    assert "early stopping: no better dev accuracy for 2 evaluations" in out


def run_script_with(task, monkeypatch, args):
    """Runs the sentiment script with `task` (patched by the caller) in place of the registry's SST task."""
    import tasks

    monkeypatch.setattr(tasks, "get_task", lambda name: task)
    return run_script("sentiment", args)


def test_nan_loss_stops_with_a_clear_message(tmp_path, task_files):
    code, out, err = run_script("sentiment", base_args(tmp_path, task_files, lr=1e30, epochs=2))
    assert code == 1
    assert err.startswith("error: training stopped: the loss") and "is not finite at epoch 1, step " in err
    assert "lower --lr" in err and "Traceback" not in err
    assert json.loads((tmp_path / "run" / "log.json").read_text())["status"] == "diverged"
    config = config_for(tmp_path / "again", task_files, lr=1e30)
    with pytest.raises(TrainingDiverged):
        run_training("sst", config)


# ----------------------------------------------------------------------------------------------- resuming
def interrupt_at_step(monkeypatch, step: int):
    """Makes training raise KeyboardInterrupt (as Ctrl-C would) just before optimizer step `step` (1-based)."""
    real_step = Trainer.train_step
    count = {"steps": 0}

    def train_step(self, group, train):
        count["steps"] += 1
        if count["steps"] == step:
            raise KeyboardInterrupt
        return real_step(self, group, train)

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.slow  # three runs of three epochs each
@pytest.mark.parametrize("save_every_steps, stop_at", [(None, 9), (2, 4)], ids=["epoch-boundary", "mid-epoch"])
def test_an_interrupted_run_resumed_ends_where_an_uninterrupted_one_does(tmp_path, task_files, monkeypatch,
                                                                         save_every_steps, stop_at):
    """24 examples in batches of 4: 6 steps an epoch. Dropout stays on, so the RNG state must be restored too."""
    options = dict(epochs=3, dropout=0.1, lr=1e-3, save_every_steps=save_every_steps, method="lora")
    assert run_script("sentiment", base_args(tmp_path / "straight", task_files, **options))[0] == 0

    interrupted = base_args(tmp_path / "interrupted", task_files, **options)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, stop_at)
        code, _, err = run_script("sentiment", interrupted)
    assert code == 130 and "--resume" in err
    saved = torch.load(checkpoint_path(tmp_path / "interrupted" / "run"), weights_only=True)["progress"]
    assert saved["step"] == (6 if save_every_steps is None else 2)
    assert json.loads((tmp_path / "interrupted" / "run" / "log.json").read_text())["status"] == "interrupted"
    code, out, _ = run_script("sentiment", interrupted + ["--resume"])
    assert code == 0 and "resumed from" in out

    straight, resumed = trained_tensors(tmp_path / "straight" / "run"), trained_tensors(tmp_path / "interrupted" / "run")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0)
    logs = [json.loads((tmp_path / d / "run" / "log.json").read_text()) for d in ("straight", "interrupted")]
    assert without_timings(logs[1]["epochs"]) == without_timings(logs[0]["epochs"])
    assert (tmp_path / "straight" / "predictions" / "lora-sst-dev-out.csv").read_text() == \
        (tmp_path / "interrupted" / "predictions" / "lora-sst-dev-out.csv").read_text()


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, task_files):
    assert run_script("sentiment", base_args(tmp_path, task_files, method="bitfit"))[0] == 0
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files, method="lora", resume=True))
    assert code == 1 and "was made by a different run" in err and "method: checkpoint" in err
    config = config_for(tmp_path, task_files, method="bitfit", resume=True, seed=3)
    with pytest.raises(ResumeError, match="seed: checkpoint 11711, now 3"):
        run_training("sst", config)


@pytest.mark.slow  # two runs, each resumed
@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_resume_refuses_a_damaged_or_foreign_checkpoint(tmp_path, task_files, damage):
    args = base_args(tmp_path, task_files)
    assert run_script("sentiment", args)[0] == 0
    path = checkpoint_path(tmp_path / "run")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    else:  # a readable torch file that this project did not write
        torch.save({"model": {}}, path)
    code, _, err = run_script("sentiment", args + ["--resume"])
    expected = "truncated or corrupt" if damage == "truncated" else "not a training checkpoint written by this project"
    assert code == 1 and str(path) in err and expected in err


def test_resume_without_a_checkpoint_says_so(tmp_path, task_files):
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files, resume=True))
    assert code == 1 and "--resume: no checkpoint at" in err


@pytest.mark.slow  # four runs
def test_a_finished_run_is_not_overwritten_without_resume_or_overwrite(tmp_path, task_files):
    args = base_args(tmp_path, task_files)
    assert run_script("sentiment", args)[0] == 0
    before = (tmp_path / "run" / "log.json").read_text()
    code, _, err = run_script("sentiment", args)
    assert code == 1 and "already holds a run" in err and "--overwrite" in err
    assert (tmp_path / "run" / "log.json").read_text() == before
    code, out, _ = run_script("sentiment", args + ["--resume"])  # nothing left to train: predicts again
    assert code == 0 and "already finished" in out
    assert run_script("sentiment", args + ["--overwrite", "--epochs", "2"])[0] == 0
    assert len(json.loads((tmp_path / "run" / "log.json").read_text())["epochs"]) == 2


# ----------------------------------------------------------------------------------------------- trainer state
def test_progress_and_best_are_what_the_resume_checkpoint_stores(tmp_path, task_files):
    """The checkpoint holds the Progress and Best dataclasses as dicts, and the trained tensors are the ones the
    best adapter holds (one function gathers both)."""
    from dataclasses import asdict

    from safetensors.torch import load_file

    from models.loading import load_torch_file
    from tasks.trainer import Best, Progress

    code, _, err = run_script("sentiment", base_args(tmp_path, task_files, max_train_examples=8, max_eval_examples=4))
    assert code == 0, err
    state = load_torch_file(tmp_path / "run" / "last" / "checkpoint.pt")
    assert Progress.from_dict(state["progress"]) == Progress(epoch=1, step=2)  # 8 examples, batch 4: 2 steps
    assert set(state["progress"]) == set(asdict(Progress())) and Best(**state["best"]).epoch == 1
    adapter = load_file(tmp_path / "run" / "best" / "adapter.safetensors")
    assert set(adapter) == set(state["trainable"])
    assert all(torch.equal(adapter[key], state["trainable"][key]) for key in adapter)  # one epoch: best is last


def test_progress_reads_checkpoints_written_before_its_fields_were_named():
    from tasks.trainer import Progress

    old = {"epoch": 2, "batch": 3, "step": 40, "loss_sum": 1.5, "terms": 12, "tokens": 300, "seconds": 2.0,
           "grad_norm_sum": 4.0, "steps": 3}
    assert Progress.from_dict(old) == Progress(epoch=2, batch=3, step=40, epoch_steps=3, loss_sum=1.5, terms=12,
                                               tokens=300, seconds=2.0, grad_norm_sum=4.0)
    assert Progress(epoch=2, step=40, tokens=9).next_epoch() == Progress(epoch=3, step=40)


def test_threads_apply_for_the_run_and_are_restored_after_it(tmp_path, task_files, monkeypatch):
    seen = []
    monkeypatch.setattr(Trainer, "run", lambda self: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    target = 2 if before == 1 else 1
    run_training("sst", config_for(tmp_path, task_files, threads=target))
    assert seen == [target] and torch.get_num_threads() == before
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files, threads=0))
    assert code == 2 and "--threads: must be a positive integer, got '0'" in err
