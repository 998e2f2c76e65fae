"""tasks/checkpoint.py: the run directory's guards. --overwrite loses nothing until the new run's inputs are
good, a run interrupted before its first checkpoint can be resumed (it starts again), a second run into the
same directory is refused while a killed one leaves no stale lock, interrupted writes leave no litter, and a
run that fails says so in its log."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import trainer
from tasks.checkpoint import RunLock, checkpoint_path
from tests.fixtures.task_files import base_args, run_script

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]
ROOT = Path(__file__).resolve().parents[1]


def quick_args(tmp_path, task_files, **overrides):
    return base_args(tmp_path, task_files, max_train_examples=8, max_eval_examples=4, **overrides)


@pytest.mark.slow  # several runs
def test_overwrite_with_a_bad_input_keeps_the_earlier_run(tmp_path, task_files):
    assert run_script("sentiment", quick_args(tmp_path, task_files))[0] == 0
    log = (tmp_path / "run" / "log.json").read_text()
    bad = quick_args(tmp_path, task_files._replace(data=tmp_path / "nowhere")) + ["--overwrite"]
    code, _, err = run_script("sentiment", bad)
    assert code == 1 and "directory does not exist" in err
    assert (tmp_path / "run" / "log.json").read_text() == log and (tmp_path / "run" / "best").is_dir()
    assert checkpoint_path(tmp_path / "run").is_file()


@pytest.mark.slow  # several runs
def test_a_run_interrupted_before_its_first_checkpoint_resumes_by_starting_again(tmp_path, task_files, monkeypatch):
    args = quick_args(tmp_path, task_files)
    real_step = trainer.Trainer.train_step

    def interrupt(self, group, train):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Trainer, "train_step", interrupt)
    code, _, err = run_script("sentiment", args)
    assert code == 130 and "--resume" in err and not checkpoint_path(tmp_path / "run").exists()
    assert json.loads((tmp_path / "run" / "log.json").read_text())["status"] == "interrupted"
    monkeypatch.setattr(trainer.Trainer, "train_step", real_step)
    code, out, err = run_script("sentiment", args + ["--resume"])
    assert code == 0, err
    assert "has no checkpoint yet" in out and "starting it again from the beginning" in out
    resumed = json.loads((tmp_path / "run" / "log.json").read_text())
    code, _, _ = run_script("sentiment", quick_args(tmp_path / "plain", task_files))
    plain = json.loads((tmp_path / "plain" / "run" / "log.json").read_text())
    assert resumed["status"] == "finished" and resumed["epochs"][0]["train_loss"] == plain["epochs"][0]["train_loss"]


@pytest.mark.slow  # several runs
def test_a_second_run_into_the_same_directory_is_refused_and_a_killed_ones_lock_goes_with_it(tmp_path, task_files):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; from tasks.checkpoint import RunLock; "
         f"lock = RunLock(Path({str(run_dir)!r})).acquire(); print('locked', flush=True); sys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = run_script("sentiment", quick_args(tmp_path, task_files))
        assert code == 1 and f"{run_dir} is in use by another run (pid {holder.pid}" in err
        assert not (run_dir / "log.json").exists()  # the second run changed nothing
    finally:
        holder.kill()  # as kill -9 would: no clean-up runs in the holder
        holder.wait()
    code, _, err = run_script("sentiment", quick_args(tmp_path, task_files))
    assert code == 0, err


def test_the_lock_is_exclusive_within_one_process_too(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(OSError, match="is in use by another run"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


@pytest.mark.slow  # several runs
def test_temporary_files_left_by_a_killed_write_are_removed(tmp_path, task_files):
    assert run_script("sentiment", quick_args(tmp_path, task_files, epochs=1))[0] == 0
    litter = [tmp_path / "run" / "last" / ".checkpoint.pt.k3j2.tmp", tmp_path / "run" / "best" / ".adapter.safetensors.x.tmp"]
    for path in litter:
        path.write_bytes(b"half a checkpoint")
    keep = tmp_path / "run" / "notes.tmp"  # not an atomic write's temporary file
    keep.write_text("mine")
    code, out, err = run_script("sentiment", quick_args(tmp_path, task_files, epochs=1) + ["--resume"])
    assert code == 0, err
    assert not any(path.exists() for path in litter) and keep.exists()
    assert f"removed {litter[0]}, left by an interrupted write" in out


def test_a_run_that_fails_while_writing_says_so_in_its_log(tmp_path, task_files, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "save_adapter", disk_full)
    code, _, err = run_script("sentiment", quick_args(tmp_path, task_files))
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["status"] == "failed" and "No space left on device" in log["final"]["error"]


def test_an_unwritable_output_location_stops_the_run_before_training(tmp_path, task_files, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    trained = []
    monkeypatch.setattr(trainer.Trainer, "train_epoch", lambda self, epoch: trained.append(epoch))
    code, _, err = run_script("sentiment", quick_args(tmp_path, task_files, predictions_dir=blocker / "predictions"))
    assert code == 1 and f"cannot write in {blocker / 'predictions'}: Not a directory" in err and not trained
