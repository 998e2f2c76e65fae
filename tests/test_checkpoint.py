"""tasks/checkpoint.py: the run directory's guards. --overwrite loses nothing until the new run's inputs are
good, a run interrupted before its first checkpoint can be resumed (it starts again), a second run into the
same directory is refused while a killed one leaves no stale lock, interrupted writes leave no litter, and a
run that fails says so in its log."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.readers import default_paths

from tasks import trainer
from tasks.checkpoint import RunLock, checkpoint_path
from tests.fixtures.task_files import base_args, run_script, write_data_dir

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


# ----------------------------------------------------------------------------------------------- what a resume checks
def edit_field(path: Path, line: int, column: int, edit) -> None:
    """Replaces field `column` of line `line` (1-based) of a tab-separated file by edit(field)."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    fields = lines[line - 1].rstrip("\n").split("\t")
    fields[column] = edit(fields[column])
    lines[line - 1] = "\t".join(fields) + "\n"
    path.write_text("".join(lines), encoding="utf-8")


@pytest.mark.slow  # a run, then resumes
def test_a_resume_with_other_rows_under_the_same_file_names_is_refused(tmp_path, task_files):
    data = write_data_dir(tmp_path / "data")
    args = quick_args(tmp_path, task_files._replace(data=data)) + ["--resume"]
    assert run_script("sentiment", args[:-1])[0] == 0
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert set(log["fingerprints"]) == {"tokenizer", "train"}
    code, out, err = run_script("sentiment", args)  # nothing changed: a finished run just predicts again
    assert code == 0 and "already finished" in out, err

    paths = default_paths("sst", data)
    original = paths["train"].read_text(encoding="utf-8")
    edit_field(paths["train"], 3, 2, lambda sentence: "quite " + sentence)  # one training sentence changed
    code, _, err = run_script("sentiment", args)
    assert code == 1 and "Traceback" not in err
    assert err.startswith(f"error: {checkpoint_path(tmp_path / 'run')}: cannot resume, what this run reads has "
                          f"changed since the checkpoint: the training examples ({paths['train']}) (fingerprint ")
    assert "tokenizer" not in err.split("Resume with")[0]
    paths["train"].write_text(original, encoding="utf-8")
    code, out, err = run_script("sentiment", args)  # the same rows again
    assert code == 0 and "already finished" in out, err


def test_a_resume_with_another_tokenizer_is_refused_and_a_copy_of_the_same_one_is_not(tmp_path, task_files):
    args = quick_args(tmp_path, task_files) + ["--resume"]
    assert run_script("sentiment", args[:-1])[0] == 0
    same, other = tmp_path / "same-tokenizer", tmp_path / "other-tokenizer"
    for copy in (same, other):
        copy.mkdir()
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(Path(task_files.tokenizer) / name, copy / name)
    merges = (other / "merges.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    (other / "merges.txt").write_text("".join(merges[:-1]), encoding="utf-8")  # one merge fewer
    code, out, err = run_script("sentiment", args + ["--tokenizer", str(same)])
    assert code == 0 and "already finished" in out, err
    code, _, err = run_script("sentiment", args + ["--tokenizer", str(other)])
    assert code == 1 and "Traceback" not in err
    assert f"has changed since the checkpoint: the tokenizer ({other}) (fingerprint " in err
    assert "training examples" not in err  # re-tokenised examples follow from the tokenizer: it alone is named


@pytest.mark.parametrize("damage, message", [
    (lambda state: state.pop("optimizer"), "it has no 'optimizer' entry"),
    (lambda state: state["progress"].pop("epoch"), "its 'progress' record has no 'epoch'"),
    (lambda state: state["best"].pop("metric"), "its 'best' record has no 'metric'"),
    (lambda state: state.update(rng=[]), "its 'rng' entry does not fit this run"),
    (lambda state: state.update(optimizer={"state": {}}), "its 'optimizer' entry does not fit this run"),
    (lambda state: state.update(trainable=None), "its 'trainable' entry does not fit this run"),
    (lambda state: state.update(history=None), "its 'history' entry is not a list"),
], ids=["no-optimizer", "no-progress-epoch", "no-best-metric", "empty-rng", "bad-optimizer", "bad-trainable",
        "bad-history"])
def test_a_checkpoint_with_an_entry_missing_is_one_line_naming_the_file_and_the_entry(tmp_path, task_files, monkeypatch,
                                                                                      damage, message):
    """A checkpoint written after the first of two steps, damaged, then resumed."""
    args = quick_args(tmp_path, task_files, save_every_steps=1)
    real_step, steps = trainer.Trainer.train_step, []

    def stop_before_the_second_step(self, group, train):
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return real_step(self, group, train)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "train_step", stop_before_the_second_step)
        assert run_script("sentiment", args)[0] == 130
    path = checkpoint_path(tmp_path / "run")
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    code, _, err = run_script("sentiment", args + ["--resume"])
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {path}: damaged checkpoint, {message}")


@pytest.mark.slow  # two epochs
@pytest.mark.parametrize("target", ["checkpoint", "best adapter", "checkpoint and log"])
def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path, task_files, monkeypatch, target):
    """The second write of the checkpoint or of the best adapter (epoch 2) writes half its bytes, then the disk is
    full. The error names the file; epoch 1's file is still there, whole; no temporary file is left; the log says
    failed, unless the disk refuses the log as well, in which case the error reported is still the first one."""
    import safetensors.torch

    import tasks
    from models.loading import load_torch_file

    task = tasks.get_task("sst")
    real_metrics, evaluations = task.metrics, []

    def better_each_epoch(examples, predictions):  # so that epoch 2's model is saved as the best
        evaluations.append(1)
        return {**real_metrics(examples, predictions), "accuracy": len(evaluations) / 10}

    monkeypatch.setattr(task, "metrics", better_each_epoch)
    monkeypatch.setattr(tasks, "get_task", lambda name: task)
    module, name = (safetensors.torch, "save_file") if target == "best adapter" else (torch, "save")
    real_save, writes, full = getattr(module, name), [], []

    def half_then_full(obj, path, *args, **kwargs):
        writes.append(path)
        if len(writes) < 2:
            return real_save(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"half a file")
        full.append(path)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, name, half_then_full)
    if target == "checkpoint and log":
        real_atomic_save = trainer.atomic_save

        def log_refused_once_full(write, path):
            if full:
                raise OSError(28, f"cannot write {path}: No space left on device")
            return real_atomic_save(write, path)

        monkeypatch.setattr(trainer, "atomic_save", log_refused_once_full)
    code, _, err = run_script("sentiment", quick_args(tmp_path, task_files, epochs=2))
    run = tmp_path / "run"
    path = run / "best" / "adapter.safetensors" if target == "best adapter" else checkpoint_path(run)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == f"error: [Errno 28] cannot write {path}: No space left on device"
    monkeypatch.undo()
    checkpoint = load_torch_file(checkpoint_path(run))
    assert checkpoint["progress"]["epoch"] == 1  # epoch 1's checkpoint, whole
    if target == "best adapter":
        best = safetensors.torch.load_file(path)
        assert best.keys() == checkpoint["trainable"].keys()
        assert all(torch.equal(best[key], checkpoint["trainable"][key]) for key in best)  # epoch 1's model
    assert not list(run.rglob("*.tmp"))
    status = json.loads((run / "log.json").read_text())
    if target == "checkpoint and log":
        assert status["status"] == "running" and len(status["epochs"]) == 2  # the last log that could be written
    else:
        assert status["status"] == "failed" and str(path) in status["final"]["error"]
