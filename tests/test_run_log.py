"""Step logs: steps.jsonl every --log-every steps, continued sensibly by a resumed run; the end-of-run plot;
TensorBoard only when asked (and installed)."""
from __future__ import annotations

import builtins
import json

import pytest

from tasks.run_log import STEP_LOG, StepLog, plot_run, read_step_log
from tests.fixtures.task_files import base_args, run_script


def test_every_n_steps_and_resume_trims_what_the_checkpoint_does_not_hold(tmp_path):
    log = StepLog(tmp_path, every=2)
    for step in range(1, 8):
        log.step(step, {"loss": 1.0 / step, "lr": 0.1, "grad_norm": float("nan"), "epoch": 1})
    log.close()
    entries = read_step_log(tmp_path / STEP_LOG)
    assert [e["step"] for e in entries] == [2, 4, 6]
    assert entries[0] == {"step": 2, "loss": 0.5, "lr": 0.1, "grad_norm": None, "epoch": 1}  # NaN: JSON null
    with open(tmp_path / STEP_LOG, "a") as file:
        file.write('{"step": 8, "lo')  # a line torn by a crash
    assert [e["step"] for e in read_step_log(tmp_path / STEP_LOG)] == [2, 4, 6]

    resumed = StepLog(tmp_path, every=2, start_step=4)  # the checkpoint holds step 4: steps 5.. train again
    resumed.step(6, {"loss": 0.2})
    resumed.close()
    assert [(e["step"], e["loss"]) for e in read_step_log(tmp_path / STEP_LOG)] == [(2, 0.5), (4, 0.25), (6, 0.2)]
    StepLog(tmp_path, every=2).close()  # a fresh run starts an empty file
    assert read_step_log(tmp_path / STEP_LOG) == []


def test_tensorboard_missing_is_one_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def without_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_tensorboard)
    with pytest.raises(ValueError, match=r"--tensorboard needs the tensorboard package \(pip install tensorboard\)"):
        StepLog(tmp_path, every=1, tensorboard=True)


def test_plot_of_loss_and_dev_metric(tmp_path):
    pytest.importorskip("matplotlib")
    history = [{"epoch": 1, "step": 3, "train_loss": 2.0, "dev": {"accuracy": 0.4}},
               {"epoch": 2, "step": 6, "train_loss": 1.5, "dev": {"accuracy": 0.5}}]
    path = plot_run(tmp_path, history, "accuracy", "sst / lora")
    assert path == tmp_path / "training.png" and path.read_bytes().startswith(b"\x89PNG")
    assert plot_run(tmp_path / "empty", [], "accuracy") is None


@pytest.mark.slow  # an interrupted run and its resumption
@pytest.mark.filterwarnings("ignore:GPT2Model. random weights")
@pytest.mark.usefixtures("one_thread")
def test_a_resumed_run_continues_the_step_log(tmp_path, task_files, monkeypatch):
    from tasks.trainer import warmup_then_decay
    from tests.test_trainer import interrupt_at_step

    args = base_args(tmp_path, task_files, log_every=1, save_every_steps=3)  # one epoch of 6 steps
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 6)  # steps 1-5 ran and were logged; the checkpoint holds step 3
        assert run_script("sentiment", args)[0] == 130
    assert [e["step"] for e in read_step_log(tmp_path / "run" / STEP_LOG)] == [1, 2, 3, 4, 5]
    code, _, err = run_script("sentiment", args + ["--resume"])
    assert code == 0, err
    entries = read_step_log(tmp_path / "run" / STEP_LOG)
    assert [e["step"] for e in entries] == list(range(1, 7)) and {e["epoch"] for e in entries} == {1}
    assert all(e["loss"] > 0 and e["grad_norm"] > 0 and e["tokens_per_second"] > 0 for e in entries)
    factor = warmup_then_decay(6, 1)  # the learning rate each step used: 1 warmup step of 6, then decay
    assert [e["lr"] for e in entries] == pytest.approx([1e-3 * factor(i) for i in range(6)])
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["config"]["log_every"] == 1 and (tmp_path / "run" / "training.png").is_file()
