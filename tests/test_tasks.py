"""The three task scripts end to end on a tiny random model: prediction files in the course's formats, the
sonnet script's generation and chrF, the sonnet task's errors, falling training losses, every --method and
its options, a local checkpoint directory as --model, and the random-weights warning. What each task adds to
the loop is in test_sentiment.py, test_paraphrase.py, test_sonnet.py and test_classification.py; the flags
are in test_cli.py."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
from sacrebleu.metrics import CHRF

from data.readers import (
    PARAPHRASE_COLUMN,
    SENTIMENT_COLUMN,
    default_paths,
    read_paraphrase,
    read_predictions,
    read_sentiment,
    read_sonnets,
    write_sonnets,
)
from models.gpt2 import GPT2Model
from models.methods import method_names
from models.peft import MethodConfig, apply_method, load_adapter, parameter_summary
from tasks import get_task
from tests.fixtures.task_files import base_args, run_script, tokenizer_of

pytestmark = [pytest.mark.filterwarnings("ignore:GPT2Model. random weights"), pytest.mark.usefixtures("one_thread")]


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("script, task, files", [
    ("sentiment", "sst", ("full-sst-dev-out.csv", "full-sst-test-out.csv")),
    pytest.param("sentiment", "cfimdb", ("full-cfimdb-dev-out.csv", "full-cfimdb-test-out.csv"), marks=pytest.mark.slow),
    pytest.param("paraphrase", "quora", ("full-para-dev-out.csv",), marks=pytest.mark.slow),
])
def test_classification_scripts_write_well_formed_prediction_files(tmp_path, task_files, script, task, files):
    data_dir = task_files.data
    args = base_args(tmp_path, task_files, method="full") + (["--task", task] if script == "sentiment" else [])
    code, out, err = run_script(script, args)
    assert code == 0, err
    assert f"{task} / full: trainable params:" in out and f"{task} / full: dev accuracy" in out
    column = PARAPHRASE_COLUMN if task == "quora" else SENTIMENT_COLUMN
    labels = {0, 1} if task != "sst" else set(range(5))
    for name in files:
        split = "dev" if "-dev-" in name else "test"
        reader = read_paraphrase if task == "quora" else read_sentiment
        expected_ids = [row.id for row in reader(default_paths(task, data_dir)[split], require_labels=False)]
        predictions = read_predictions(tmp_path / "predictions" / name, column_name=column)
        assert list(predictions) == expected_ids
        assert set(predictions.values()) <= labels
    log = json.loads((tmp_path / "run" / "log.json").read_text())
    assert log["final"]["dev"] == log["epochs"][0]["dev"]

    # The dev predictions are the saved best model's, example by example, and the logged accuracy is theirs.
    dev_rows = (read_paraphrase if task == "quora" else read_sentiment)(default_paths(task, data_dir)["dev"])
    predicted = read_predictions(tmp_path / "predictions" / files[0], column_name=column)
    assert log["final"]["dev"]["accuracy"] == pytest.approx(
        sum(predicted[row.id] == int(row.label) for row in dev_rows) / len(dev_rows))
    task_object, tokenizer = get_task(task), tokenizer_of(task_files)
    model = load_adapter(task_object.build_model(GPT2Model.from_pretrained(task_files.model), tokenizer),
                         tmp_path / "run" / "best").eval()
    for row in dev_rows:
        ids, _ = task_object.encode_row(tokenizer, row, model.gpt.config.n_positions)
        with torch.no_grad():
            logits = model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0]
        top2 = logits.topk(2).values
        assert predicted[row.id] == int(logits.argmax()) or top2[0] - top2[1] < 1e-4, row.id


@pytest.mark.slow  # trains, then generates for dev and test
def test_sonnet_script_writes_generated_sonnets_for_dev_and_test(tmp_path, task_files):
    data_dir = task_files.data
    args = base_args(tmp_path, task_files, max_new_tokens=12, max_train_examples=4, max_eval_examples=4)
    code, out, err = run_script("sonnet", args)
    assert code == 0, err
    assert "sonnet / lora: dev chrf" in out
    paths = default_paths("sonnet", data_dir)
    for split, name in (("dev", "lora-generated-sonnets-dev.txt"), ("test", "lora-generated-sonnets.txt")):
        written = tmp_path / "predictions" / name
        assert written.read_text().startswith("--Generated Sonnets-- \n\n")
        generated, prompts = read_sonnets(written), read_sonnets(paths[split])[:4]
        assert [s.number for s in generated] == [s.number for s in prompts]
        for sonnet, prompt in zip(generated, prompts):
            assert sonnet.text.startswith(prompt.text) and len(sonnet.text) > len(prompt.text)
    chrf = json.loads((tmp_path / "run" / "log.json").read_text())["final"]["dev"]["chrf"]
    generated = read_sonnets(tmp_path / "predictions" / "lora-generated-sonnets-dev.txt")
    references = read_sonnets(paths["dev_true"])[:4]
    assert chrf == pytest.approx(CHRF().corpus_score([s.text for s in generated], [[s.text for s in references]]).score)
    assert 0 < chrf < 100


def test_sonnet_prompt_longer_than_max_length_is_named(tmp_path, task_files):
    code, _, err = run_script("sonnet", base_args(tmp_path, task_files, max_length=8))
    assert code == 1 and "first lines take" in err and "--max-length 8" in err and "sonnet" in err


@pytest.mark.slow  # two sonnet runs
def test_sonnet_dev_references_missing_or_incomplete(tmp_path, task_files):
    data = tmp_path / "data"
    shutil.copytree(task_files.data, data)
    true_path = default_paths("sonnet", data)["dev_true"]
    write_sonnets(true_path, read_sonnets(true_path)[:1])  # the true text of one dev sonnet only
    args = base_args(tmp_path, task_files, max_new_tokens=4, max_train_examples=2) + ["--data-dir", str(data)]
    code, _, err = run_script("sonnet", args)
    assert code == 1 and str(true_path) in err and "holds no true text for dev sonnet(s)" in err

    true_path.unlink()  # no references at all: the run goes on, says why there is no chrF
    code, out, err = run_script("sonnet", args + ["--overwrite"])
    assert code == 0, err
    assert f"no true sonnets at {true_path}" in out and "no dev labels" in out


@pytest.mark.slow  # four epochs of each task
@pytest.mark.parametrize("script, task, options", [
    ("sentiment", "sst", {"method": "full", "lr": 1e-3}),
    ("paraphrase", "quora", {"method": "lora", "lr": 1e-2}),
    ("sonnet", "sonnet", {"method": "full", "lr": 1e-2, "max_new_tokens": 4, "eval_every": 10}),
])
def test_training_loss_falls(tmp_path, task_files, script, task, options):
    args = base_args(tmp_path, task_files, epochs=4, max_train_examples=8, max_eval_examples=4, **options)
    code, _, err = run_script(script, args)
    assert code == 0, err
    losses = [entry["train_loss"] for entry in json.loads((tmp_path / "run" / "log.json").read_text())["epochs"]]
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))


# ----------------------------------------------------------------------------------------------- methods
@pytest.mark.slow  # one run per method
@pytest.mark.parametrize("method", method_names())
def test_every_method_trains_and_prints_its_parameter_count(tmp_path, task_files, method):
    args = base_args(tmp_path, task_files, method=method, max_train_examples=4, max_eval_examples=4)
    code, out, err = run_script("paraphrase", args)
    assert code == 0, err
    gpt = GPT2Model.from_pretrained(str(task_files.model))
    model = get_task("quora").build_model(apply_method(gpt, MethodConfig(method)), tokenizer_of(task_files))
    expected = parameter_summary(model)
    assert f"trainable params: {expected['trainable']:,} || all params: {expected['total']:,}" in out
    if method == "last-linear-layer":
        assert expected["trainable"] == 2 * 64 + 2  # only the 2-row head
    assert f"{expected['trainable']:,} trainable params" in out.splitlines()[-1]


@pytest.mark.slow  # one run per method and task
@pytest.mark.parametrize("script, task", [("sentiment", "sst"), ("paraphrase", "quora"), ("sonnet", "sonnet")])
@pytest.mark.parametrize("method, flags", [("lora", {"lora_targets": "c_attn"}), ("dora", {}),
                                           ("ia3", {"ia3_targets": "c_attn,ffn"})])
def test_weight_update_methods_train_on_every_task_and_reload(tmp_path, task_files, script, task, method, flags):
    options = dict(max_train_examples=4, max_eval_examples=4, seed=0, **flags)
    if script == "sonnet":
        options.update(max_new_tokens=4)
    code, out, err = run_script(script, base_args(tmp_path, task_files, method=method, **options)
                                + (["--task", task] if script == "sentiment" else []))
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())["methods"][0]
    assert saved["method"] == method and {k: ",".join(saved[k.replace("lora_", "")]) for k in flags} == flags
    torch.manual_seed(0)  # the trainer's seed before it builds the base: the same (random) weights
    gpt = apply_method(GPT2Model.from_pretrained(str(task_files.model)), MethodConfig.from_dict(saved))
    model = get_task(task).build_model(gpt, tokenizer_of(task_files))
    assert f"trainable params: {parameter_summary(model)['trainable']:,}" in out
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    load_adapter(model, tmp_path / "run" / "best")  # onto the same method: the trained tensors replace the initial ones
    moved = [name for name, p in model.named_parameters() if not torch.equal(p, before[name])]
    assert moved and all(f".{method if method != 'dora' else 'lora'}." in name or not name.startswith(("gpt.", "h."))
                         for name in moved), moved


def test_sonnet_refuses_last_linear_layer_with_a_reason(tmp_path, task_files):
    code, _, err = run_script("sonnet", base_args(tmp_path, task_files, method="last-linear-layer"))
    assert code == 1 and "sonnet task has none" in err


def test_method_options_reach_the_model(tmp_path, task_files):
    args = base_args(tmp_path, task_files, method="loreft", rank=2, positions="l1", layers="1", max_train_examples=4)
    code, out, err = run_script("sentiment", args)
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "best" / "adapter_config.json").read_text())
    assert config["methods"][0] == {**MethodConfig("loreft", rank=2, positions="l1", layers=[1]).to_dict()}
    # One layer, one rank-2 intervention on the FFN output: 2 * 64 * 2 + 2, plus the 5-class head.
    assert f"trainable params: {2 * 64 * 2 + 2 + 5 * 64 + 5:,}" in out


# ----------------------------------------------------------------------------------------------- model and tokenizer
@pytest.mark.slow  # two runs
def test_a_local_checkpoint_directory_brings_its_own_tokenizer(tmp_path, task_files):
    """--model DIR loads the saved weights, and without --tokenizer the vocabulary files in DIR are used."""
    import shutil

    from models.config import GPT2Config

    torch.manual_seed(0)
    model_dir = GPT2Model(GPT2Config(n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "model")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(task_files.tokenizer / name, model_dir / name)
    args = base_args(tmp_path, task_files._replace(tokenizer=None, model=model_dir), max_train_examples=4)
    code, out, err = run_script("sentiment", args)
    assert code == 0, err
    assert "sst / lora: trainable params:" in out

    torch.manual_seed(0)
    GPT2Model(GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2)).save_pretrained(tmp_path / "small")
    args = base_args(tmp_path / "again", task_files._replace(model=tmp_path / "small"))
    code, _, err = run_script("sentiment", args)
    assert code == 1 and "more than the vocabulary of the model" in err


def test_random_model_warning_is_shown_once_per_run(tmp_path, task_files):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        args = base_args(tmp_path, task_files, model="random:tiny", max_train_examples=4)
        assert run_script("sentiment", args)[0] == 0
    assert sum("random weights" in str(w.message) for w in caught) == 1
