"""The three task scripts end to end on a tiny random model, and what each task adds to the loop: sentiment's
truncation, the paraphrase cloze head, the sonnet language-model loss and generation, prediction files in
the course's formats, clear errors for bad data and bad flags, and every --method."""
from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
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
from models.peft import METHODS, MethodConfig, apply_method, load_adapter, parameter_summary
from models.tokenizer import GPT2Tokenizer
import tasks.paraphrase
from tasks import get_task
from tasks.cli import parse_args
from tasks.classification import LastTokenClassifier
from tasks.paraphrase import ANSWERS, PROMPT, answer_token_ids, encode_pair
from tasks.sonnet import split_prompt
from tasks.task import Example
from tests.conftest import random_model
from tests.test_task_fixtures import base_args, one_thread, run_script, task_files, write_data_dir  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore:GPT2Model. random weights")


def tokenizer_of(task_files) -> GPT2Tokenizer:
    return GPT2Tokenizer.from_pretrained(task_files.tokenizer)


# ----------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("script, task, files", [
    ("sentiment", "sst", ("full-sst-dev-out.csv", "full-sst-test-out.csv")),
    ("sentiment", "cfimdb", ("full-cfimdb-dev-out.csv", "full-cfimdb-test-out.csv")),
    ("paraphrase", "quora", ("full-para-dev-out.csv",)),
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
@pytest.mark.parametrize("method", METHODS)
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


# ----------------------------------------------------------------------------------------------- paraphrase
def test_paraphrase_head_starts_as_the_cloze_on_the_answer_tokens(task_files):
    tokenizer = tokenizer_of(task_files)
    torch.manual_seed(0)
    gpt = random_model("tiny")
    model = get_task("quora").build_model(apply_method(gpt, MethodConfig("last-linear-layer")), tokenizer)
    prompts = [encode_pair(tokenizer, "How do I learn?", "What is the way to learn?", 1024)[0],
               encode_pair(tokenizer, "Why?", "Is the sky blue?", 1024)[0]]
    ids = torch.full((2, max(map(len, prompts))), tokenizer.eos_token_id)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)], mask[row, :len(prompt)] = torch.tensor(prompt), 1
    with torch.no_grad():
        head_logits = model(ids, mask)
        vocabulary_logits = gpt.hidden_state_to_token(gpt(ids, mask)["last_token"])
    answers = answer_token_ids(tokenizer)
    torch.testing.assert_close(head_logits, vocabulary_logits[:, answers], rtol=1e-6, atol=1e-6)
    assert answers == [tokenizer.encode("no")[0], tokenizer.encode("yes")[0]] and ANSWERS == ("no", "yes")


def test_answer_tokens_come_from_the_tokenizer(task_files, tmp_path, monkeypatch):
    from tests.tiny_tokenizer import write_tiny_tokenizer

    tiny = GPT2Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))
    assert answer_token_ids(tiny) == [259, 262]  # the tiny vocabulary's "no" and "yes"
    if tokenizer_of(task_files).vocab_size == 50257:
        assert answer_token_ids(tokenizer_of(task_files)) == [3919, 8505]  # the course's ids
    monkeypatch.setattr(tasks.paraphrase, "ANSWERS", ("nope", "yes"))
    with pytest.raises(ValueError, match="splits 'nope' into 3 tokens"):
        answer_token_ids(tiny)


def test_paraphrase_prompt_cuts_the_questions_never_the_instruction(task_files):
    tokenizer = tokenizer_of(task_files)
    instruction = sum(len(tokenizer.encode(piece)) for piece in PROMPT)
    limit = instruction + 24
    long_question = "why " * 300
    ids, cut = encode_pair(tokenizer, long_question, "Is it short?", max_length=limit)
    assert cut and len(ids) == limit
    text = tokenizer.decode(ids)
    assert text.startswith(PROMPT[0]) and text.endswith('"\nQuestion 2: "Is it short?' + PROMPT[2])
    ids, cut = encode_pair(tokenizer, long_question, long_question, max_length=limit)
    text = tokenizer.decode(ids)
    assert cut and len(ids) == limit and text.endswith(PROMPT[2])
    first, second = (len(tokenizer.encode(part)) for part in text[len(PROMPT[0]):-len(PROMPT[2])].split(PROMPT[1]))
    assert abs(first - second) <= 1  # both questions cut, equally
    short, cut = encode_pair(tokenizer, "A?", "B?", max_length=limit)
    assert not cut and tokenizer.decode(short) == PROMPT[0] + "A?" + PROMPT[1] + "B?" + PROMPT[2]
    with pytest.raises(ValueError, match=f"--max-length {instruction} is too short for the paraphrase prompt"):
        encode_pair(tokenizer, long_question, long_question, max_length=instruction)


# ----------------------------------------------------------------------------------------------- sentiment
def test_long_texts_keep_their_end_and_are_counted(tmp_path, task_files):
    config = parse_args("sst", base_args(tmp_path, task_files, max_length=6))
    task = get_task("sst")
    data = task.load(config, tokenizer_of(task_files), max_length=6)
    assert all(example.length <= 6 for split in data.splits.values() for example in split)
    assert data.truncated["train"] > 0
    tokenizer = tokenizer_of(task_files)
    row = read_sentiment(default_paths("sst", task_files.data)["train"])[0]
    assert data.splits["train"][0].input_ids == tokenizer.encode(row.text)[-6:]
    code, out, err = run_script("sentiment", base_args(tmp_path / "cli", task_files, max_length=6))
    assert code == 0, err
    assert "train texts were longer than 6 tokens and were truncated" in out


def test_last_token_classifier_reads_each_rows_last_real_token():
    torch.manual_seed(0)
    model = LastTokenClassifier(random_model("tiny"), 3).eval()
    ids = torch.randint(0, 1000, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        batched = model(ids, mask)
        alone = model(ids[1:, :4], mask[1:, :4])
    torch.testing.assert_close(batched[1:], alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- sonnets
def test_sonnet_examples_mark_their_first_three_lines_as_the_prompt(tmp_path, task_files):
    config = parse_args("sonnet", base_args(tmp_path, task_files))
    tokenizer = tokenizer_of(task_files)
    data = get_task("sonnet").load(config, tokenizer, max_length=1024)
    first = read_sonnets(default_paths("sonnet", task_files.data)["train"])[0]
    prompt, rest = split_prompt(first.text)
    example = data.splits["train"][0]
    assert prompt.count("\n") == 3 and prompt + rest == first.text + "\n"
    assert example.input_ids[:example.prompt_length] == tokenizer.encode(prompt)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert all(e.label is not None for e in data.splits["dev"]) and all(e.label is None for e in data.splits["test"])
    batch = get_task("sonnet").collate(data.splits["train"][:2], torch.device("cpu"))
    assert batch["prompt_mask"][0].sum() == example.prompt_length
    assert not (batch["prompt_mask"] & ~batch["attention_mask"].bool()).any()


def test_sonnet_loss_is_summed_over_real_tokens_only(tmp_path, task_files):
    config = parse_args("sonnet", base_args(tmp_path, task_files))
    task = get_task("sonnet")
    data = task.load(config, tokenizer_of(task_files), max_length=1024)
    torch.manual_seed(0)
    model = task.build_model(random_model("tiny"), tokenizer_of(task_files)).eval()
    examples = data.splits["train"][:3]
    with torch.no_grad():
        together = task.loss(model, task.collate(examples, torch.device("cpu")))
        alone = sum(task.loss(model, task.collate([e], torch.device("cpu"))) for e in examples)
        ids = torch.tensor([examples[0].input_ids])
        logits = model.hidden_state_to_token(model(ids)["last_hidden_state"])[0, :-1]
        direct = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(task.loss(model, task.collate(examples[:1], torch.device("cpu"))), direct,
                               rtol=1e-5, atol=1e-3)
    assert sum(task.loss_terms(e) for e in examples) == sum(e.length - 1 for e in examples)


def test_generation_drops_ids_the_tokenizer_cannot_decode(tmp_path, monkeypatch):
    """A model vocabulary larger than the tokenizer's (a padded embedding) must not crash the decoding: ids
    beyond the tokenizer's are dropped, every other one is kept."""
    from tests.tiny_tokenizer import write_tiny_tokenizer
    import tasks.sonnet

    task = get_task("sonnet")
    task.tokenizer = GPT2Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))  # 269 ids; the model has 50257
    prompt = "the yes\nno the\nis a\n"
    example = Example(id="7", input_ids=task.tokenizer.encode(prompt), text=prompt)
    sampled = [262, 300, 40000, 259, 268 + 1]  # "yes", two ids beyond the tokenizer's, "no", one more beyond
    monkeypatch.setattr(tasks.sonnet, "generate", lambda *args, **kwargs: [sampled])
    config = parse_args("sonnet", ["--max-new-tokens", "30"])
    [text] = task.predict(random_model("tiny"), [example], config, torch.device("cpu"))
    assert text == prompt + "yesno"


# ----------------------------------------------------------------------------------------------- errors
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
    ("--method", "prefix", "argument --method: invalid choice"),
    ("--rank", "4", "--rank does not apply to method 'full'"),
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
