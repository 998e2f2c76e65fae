"""--budget-steps and --budget-seconds: a run stops at the stated optimizer step (or after its first step once the
time is up), evaluates there, spans its learning-rate schedule over the budget, and a resumed run that spent its
budget is finished."""
from __future__ import annotations

import json

import pytest

from tasks.cli import parse_args
from tasks.trainer import run_training
from tests.fixtures.task_files import base_args, run_script

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]


def budget_run(tmp_path, task_files, **overrides):
    # 8 examples in batches of 2: 4 optimizer steps per epoch.
    args = base_args(tmp_path, task_files, **{"max_train_examples": 8, "max_eval_examples": 4, "batch_size": 2,
                                              "epochs": 1, **overrides})
    return run_training("sst", parse_args("sst", args)), json.loads((tmp_path / "run" / "log.json").read_text())


@pytest.mark.slow  # trains twice
def test_a_step_budget_stops_at_that_step_across_epochs_and_a_resume_keeps_it(tmp_path, task_files):
    result, log = budget_run(tmp_path, task_files, budget_steps=6)
    # --epochs 1 is replaced by the budget: a full epoch (steps 1-4) and half of a second one (5-6).
    assert [entry["step"] for entry in log["epochs"]] == [4, 6] and result.stopped == "finished"
    assert "dev" in log["epochs"][-1] and result.dev_metrics  # evaluated where it stopped
    # The schedule spans the 6 steps: warmup round(0.1 * 6) = 1 step, then lr factor (6 - 6 -> 1) / (6 - 1).
    assert log["epochs"][-1]["lr"] == pytest.approx(1e-3 / 5)
    assert log["config"]["budget_steps"] == 6
    again, _ = budget_run(tmp_path, task_files, budget_steps=6, resume=True)
    assert again.stopped == "already finished" and [e["step"] for e in again.epochs] == [4, 6]


def test_a_step_budget_inside_the_first_epoch(tmp_path, task_files):
    result, log = budget_run(tmp_path, task_files, budget_steps=3)
    assert [entry["step"] for entry in log["epochs"]] == [3] and log["epochs"][0]["train_tokens"] > 0


def test_a_time_budget_stops_after_the_step_that_spends_it(tmp_path, task_files):
    # Any optimizer step takes longer than a nanosecond, so the budget is spent after the first one.
    result, log = budget_run(tmp_path, task_files, budget_seconds=1e-9, epochs=3)
    assert [entry["step"] for entry in log["epochs"]] == [1] and result.stopped == "finished"


def test_budget_flags_and_their_errors(tmp_path, task_files):
    config = parse_args("sst", base_args(tmp_path, task_files, budget_steps=200))
    assert (config.budget_steps, config.budget_seconds, config.budget) == (200, None, "200 optimizer steps")
    assert parse_args("sst", base_args(tmp_path, task_files, budget_seconds=60, epochs=5)).budget == \
        "60 s of training (at most 5 epochs)"
    assert parse_args("sst", base_args(tmp_path, task_files, epochs=3)).budget == "3 epochs"
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files, budget_steps=5, budget_seconds=9))
    assert code == 2 and "argument --budget-seconds: not allowed with argument --budget-steps" in err
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files, budget_steps=0))
    assert code == 2 and "argument --budget-steps: must be a positive integer, got '0'" in err
