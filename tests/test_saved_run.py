"""load_run: a run directory back as its task model (base, method, head), eval mode, frozen unless asked."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from data.readers import SENTIMENT_COLUMN, read_predictions, read_sentiment
from models.gpt2 import GPT2Model
from models.peft import ADAPTER_WEIGHTS
from tasks.classification import LastTokenClassifier
from tasks.saved_run import load_run, open_run, read_run_config
from tests.fixtures.task_files import tokenizer_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]  # each file's first test trains a run


def test_load_run_rebuilds_the_best_model(trained_run, task_files):
    run_dir = trained_run("sst")
    model = load_run(run_dir)
    assert isinstance(model, LastTokenClassifier) and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert [m.method for m in model.gpt.peft_methods] == ["lora"]
    # Its dev predictions are the ones the training run wrote, example by example.
    config = read_run_config(run_dir)
    tokenizer = tokenizer_of(task_files)
    written = read_predictions(run_dir / "predictions" / "lora-sst-dev-out.csv", column_name=SENTIMENT_COLUMN)
    rows = read_sentiment(config.data_paths()["dev"])[:4]
    for row in rows:
        ids = torch.tensor([tokenizer.encode(row.text)])
        with torch.no_grad():
            assert int(model(ids, torch.ones_like(ids)).argmax()) == written[row.id]


def test_trainable_leaves_the_method_and_head_trainable(trained_run):
    from safetensors import safe_open

    run_dir = trained_run("sst")
    model = load_run(run_dir, trainable=True)
    with safe_open(str(run_dir / "best" / ADAPTER_WEIGHTS), framework="pt") as saved:
        assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(saved.keys())
    assert any(n.startswith("head.") for n, p in model.named_parameters() if p.requires_grad)


def test_a_sonnet_run_loads_as_the_language_model(trained_run):
    model = load_run(trained_run("sonnet"), precision="fp32")
    assert type(model) is GPT2Model and model.precision == "fp32" and not model.training


def test_errors_name_the_run(trained_run, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/log.json: no log.json here"):
        load_run(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(trained_run("sst"), copy)
    shutil.rmtree(copy / "best")
    with pytest.raises(FileNotFoundError, match="no saved model; the run .* stopped before its first evaluation"):
        load_run(copy)
    (copy / "log.json").write_text("{")
    with pytest.raises(ValueError, match="cannot read the run's settings"):
        load_run(copy)


def test_a_base_with_other_weights_is_refused(trained_run, tmp_path):
    run_dir = trained_run("sst")
    base = read_run_config(run_dir).model
    other = tmp_path / "other-base"
    shutil.copytree(base, other)
    model = GPT2Model.from_pretrained(other)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)
    model.save_pretrained(other)
    with pytest.raises(ValueError, match=f"adapter was trained on {base}.* this model is {other}"):
        load_run(run_dir, model=str(other))
    with pytest.warns(UserWarning, match="loading it anyway"):
        run = open_run(run_dir, model=str(other), allow_other_base=True)
    assert run.config.task == "sst" and json.loads((run_dir / "log.json").read_text())["config"]["model"] == base
