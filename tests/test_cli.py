"""tasks.cli: the scripts' flags (argparse errors that name the flag, defaults that follow the method and the
task) and problems the user can fix reported as one clear line."""
from __future__ import annotations

import argparse
import json

import pytest

from data.readers import default_paths
from tasks.cli import add_method_arguments, method_config_from_args, parse_args
from tests.fixtures.task_files import base_args, run_script, write_data_dir

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]


@pytest.mark.slow  # three runs of the script
def test_data_errors_surface_as_one_clear_line(tmp_path, task_files):
    data_dir = write_data_dir(tmp_path / "data")
    train = default_paths("sst", data_dir)["train"]
    lines = train.read_text().splitlines(keepends=True)
    lines[3] = lines[3].rstrip("\n").rsplit("\t", 1)[0] + "\t7\n"  # an SST label outside 0-4
    train.write_text("".join(lines))
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files._replace(data=data_dir)))
    assert code == 1 and err.startswith(f"error: {train}:4: unknown label '7'") and "Traceback" not in err
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files._replace(data=tmp_path / "nowhere")))
    assert code == 1 and f"{tmp_path / 'nowhere' / 'ids-sst-train.csv'}: directory does not exist (point --data-dir at the folder" in err
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files) + ["--max-length", "5000", "--overwrite"])
    assert code == 1 and "--max-length 5000 exceeds the context of the model" in err


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "argument --batch-size: must be a positive integer, got '0'"),
    ("--lr", "-1", "argument --lr: must be in (0, inf)"),
    ("--warmup-ratio", "1.5", "argument --warmup-ratio: must be in [0, 1)"),
    ("--precision", "fp16", "argument --precision: invalid choice"),
    ("--method", "prefixes", "argument --method: invalid choice"),
    ("--rank", "4", "--rank does not apply to method 'full'"),
    ("--seed", str(2**64), "argument --seed: must be an integer from -2**63 to 2**64 - 1 (what torch's random "
                           f"generators accept), got {2**64}"),
    ("--seed", "1.5", "argument --seed: must be an integer, got '1.5'"),
])
def test_bad_flags_are_argparse_errors_naming_the_flag(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit:
        parse_args("sst", [flag, value])
    assert exit.value.code == 2 and message in capsys.readouterr().err


def test_defaults_follow_the_method_and_task():
    assert parse_args("sst", []).learning_rate == 1e-5
    assert parse_args("sst", ["--method", "loreft"]).learning_rate == 1e-3
    assert parse_args("sst", ["--method", "lora", "--lr", "3e-4"]).learning_rate == 3e-4
    assert str(parse_args("cfimdb", ["--method", "lora"]).run_dir) == "runs/cfimdb-lora"
    assert parse_args("sst", ["--task", "cfimdb"]).task == "cfimdb"
    assert parse_args("sst", ["--max-grad-norm", "0"]).max_grad_norm is None
    config = parse_args("sonnet", ["--temperature", "0.7", "--top-p", "0.5"])
    assert (config.temperature, config.top_p, config.task) == (0.7, 0.5, "sonnet")


def test_command_line_flags():
    parser = argparse.ArgumentParser()
    add_method_arguments(parser)
    config = method_config_from_args(parser.parse_args(
        ["--method", "loreft", "--rank", "1", "--layers", "0,2", "--positions", "l3", "--untie-positions"]))
    assert (config.method, config.rank, config.layers, config.positions, config.tie_positions) == ("loreft", 1, [0, 2], "l3", False)
    config = method_config_from_args(parser.parse_args(["--method", "lora", "--lora-targets", "query,key", "--rslora"]))
    assert config.targets == ("query", "key") and config.rslora
    with pytest.raises(SystemExit):
        method_config_from_args(parser.parse_args(["--method", "loreft", "--lora-targets", "query"]), parser)
    with pytest.raises(ValueError, match="--layers must be comma-separated"):
        method_config_from_args(parser.parse_args(["--method", "lora", "--layers", "first"]))


def test_the_seed_range_is_the_one_torchs_generators_accept():
    """The ends of the range seed torch; one past them is the C-level error that --seed now reports instead."""
    import torch

    from tasks.config import SEED_RANGE, TrainConfig

    low, high = SEED_RANGE
    for seed in (low, high):
        torch.manual_seed(seed)
        torch.Generator().manual_seed(seed)
        assert parse_args("sst", ["--seed", str(seed)]).seed == seed
    for seed in (low - 1, high + 1):
        with pytest.raises((RuntimeError, ValueError), match="Overflow|out of range|must be within"):
            torch.Generator().manual_seed(seed)
        with pytest.raises(ValueError, match=f"seed must be an integer from -2\\*\\*63 to 2\\*\\*64 - 1 .*got {seed}"):
            TrainConfig("sst", seed=seed)
    torch.manual_seed(0)


@pytest.mark.parametrize("fields, message", [
    ({"epochs": "3"}, "epochs must be int, got '3' (str)"),
    ({"lr": "1e-3"}, "lr must be float (or unset), got '1e-3' (str)"),
    ({"batch_size": 8.5, "resume": 1}, "batch_size must be int, got 8.5 (float); resume must be bool, got 1 (int)"),
    ({"data_files": {"train": 3}}, "data_files must map splits to paths, got {'train': 3}"),
    ({"epochs": True}, "epochs must be int, got True (bool)"),
    ({"data_dir": None}, "data_dir must be str, got None (NoneType)"),
    ({"task": "imdb"}, "unknown task 'imdb'; choose one of sst, cfimdb, quora, sonnet"),
])
def test_a_config_built_in_code_names_the_field_of_the_wrong_type(fields, message):
    """Not a TypeError from a comparison deep in the checks, or a failure after the model has loaded."""
    from tasks.config import TrainConfig

    fields = {"task": "sst", **fields}
    with pytest.raises(ValueError) as error:
        TrainConfig(**fields)
    assert str(error.value) == message


def test_a_config_takes_paths_and_numbers_of_any_numeric_type(tmp_path):
    import numpy as np

    from tasks.config import TrainConfig

    config = TrainConfig("sst", data_dir=tmp_path, output_dir=tmp_path / "run", lr=1, epochs=np.int64(2),
                         warmup_ratio=np.float32(0.5), cache_memory=2e9, resume=np.bool_(True),
                         data_files={"train": tmp_path / "train.csv"})
    assert config.data_dir == str(tmp_path) and config.output_dir == str(tmp_path / "run")  # stored as str: JSON
    saved = json.loads(json.dumps(config.to_dict()))
    assert saved["data_dir"] == str(tmp_path) and saved["data_files"] == {"train": str(tmp_path / "train.csv")}
    assert config.learning_rate == 1 and config.epochs == 2 and config.cache_memory == 2_000_000_000
    assert type(config.cache_memory) is int and config.resume is True


def test_an_id_the_prediction_files_cannot_hold_is_found_when_the_dev_file_is_read(tmp_path, task_files, monkeypatch):
    """Not after training, when the predictions are written: the run stops before its first step, at the line."""
    from tasks.trainer import Trainer

    data_dir = write_data_dir(tmp_path / "data")
    dev = default_paths("sst", data_dir)["dev"]
    lines = dev.read_text().splitlines(keepends=True)
    index, sent_id, rest = lines[2].split("\t", 2)
    lines[2] = "\t".join([index, sent_id + ",x", rest])
    dev.write_text("".join(lines))
    trained = []
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch: trained.append(epoch))
    code, _, err = run_script("sentiment", base_args(tmp_path, task_files._replace(data=data_dir)))
    assert code == 1 and not trained and "Traceback" not in err
    assert err.startswith(f"error: {dev}:3: id '{sent_id},x' contains a comma")


def test_the_course_flags_set_the_same_settings():
    """The CS224n starter's flags (classifier.py, paraphrase_detection.py, sonnet_generation.py) as aliases."""
    config = parse_args("sst", ["--fine-tune-mode", "last-linear-layer", "--use_gpu", "--batch_size", "64",
                                "--hidden_dropout_prob", "0.3", "--lr", "1e-3", "--epochs", "10", "--seed", "1"])
    assert (config.method.method, config.device, config.batch_size, config.dropout, config.learning_rate,
            config.epochs, config.seed) == ("last-linear-layer", "cuda", 64, 0.3, 1e-3, 10, 1)
    assert parse_args("sst", ["--fine-tune-mode", "full-model"]).method.method == "full"
    quora = parse_args("quora", ["--model_size", "gpt2-medium", "--para_train", "q/train.csv", "--para_dev",
                                 "q/dev.csv", "--para_test", "q/test.csv", "--para_dev_out", "out/d.csv",
                                 "--para_test_out", "out/t.csv"])
    assert quora.model == "gpt2-medium"
    assert quora.data_paths()["train"].as_posix() == "q/train.csv" and quora.data_paths()["test"].as_posix() == "q/test.csv"
    assert quora.prediction_files == {"dev": "out/d.csv", "test": "out/t.csv"}
    sonnet = parse_args("sonnet", ["--temperature", "1.2", "--top_p", "0.9", "--sonnet_path", "s.txt",
                                   "--held_out_sonnet_path", "h.txt", "--sonnet_out", "g.txt", "--method", "lora"])
    assert (sonnet.top_p, sonnet.data_files, sonnet.prediction_files) == \
        (0.9, {"train": "s.txt", "test": "h.txt"}, {"test": "g.txt"})
    assert parse_args("sst", ["--course-names"]).course_names


@pytest.mark.parametrize("argv, message", [
    (["--batch_size", "0"], "argument --batch_size: must be a positive integer, got '0'"),
    (["--fine-tune-mode", "full-model", "--method", "lora"], "--fine-tune-mode full-model means --method full, not lora"),
    (["--fine-tune-mode", "pretrain"], "argument --fine-tune-mode: invalid choice"),
])
def test_course_flag_errors_name_the_flag_as_typed(capsys, argv, message):
    with pytest.raises(SystemExit):
        parse_args("sst", argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow  # a training run
def test_course_names_from_the_training_script(tmp_path, task_files):
    code, _, err = run_script("paraphrase", base_args(tmp_path, task_files, course_names=True,
                                                      max_eval_examples=4) + ["--para_dev_out", str(tmp_path / "d.csv")])
    assert code == 0, err
    from data.readers import PARAPHRASE_COLUMN, read_predictions

    assert set(read_predictions(tmp_path / "d.csv", PARAPHRASE_COLUMN).values()) <= {3919, 8505}
    assert not (tmp_path / "predictions" / "para-dev-output.csv").exists()  # the course flag named another file
