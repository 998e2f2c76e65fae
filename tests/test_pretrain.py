"""tasks/pretrain.py: pretraining from scratch lowers the held-out loss, writes a checkpoint that reloads exactly
(here and in transformers), resumes bit-identically, and refuses bad input with a message naming it.

The tests pretrain a toy GPT-2 over the tiny test tokenizer (269 tokens) on a small synthetic text, so they
need neither ../shared nor the network."""
from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file

from data.readers import default_paths
from models.gpt2 import GPT2Model
from models.loading import read_config
from models.peft import MethodConfig, apply_method
from models.tokenizer import GPT2Tokenizer
from tasks import checkpoint as ckpt
from tasks.memorisation import memorise
from tasks.pretrain import PretrainConfig, Pretrainer, build_corpus, is_held_out, main, pretrain
from tests.fixtures.task_files import write_data_dir
from tests.fixtures.tiny_tokenizer import write_tiny_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

SUBJECTS = ("the film", "the actor", "a story", "the plot", "a scene")
VERBS = ("is", "was", "seems")
ADJECTIVES = ("good", "bad", "dull", "moving", "great", "poor")


def write_text(path, documents: int = 240, seed: int = 0):
    """Documents of short sentences from a small grammar: learnable structure, never the same twice in order."""
    rng = random.Random(seed)
    docs = [" ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ADJECTIVES)}." for _ in range(rng.randint(2, 5)))
            for _ in range(documents)]
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def small_config(tmp_path, **overrides) -> PretrainConfig:
    tokenizer = tmp_path / "tokenizer"
    if not (tokenizer / "vocab.json").is_file():
        write_tiny_tokenizer(tokenizer)
    text = tmp_path / "text.txt"
    if not text.is_file():
        write_text(text)
    fields = dict(preset="tiny", n_embd=32, n_layer=2, n_head=2, context=32, texts=[str(text)], tokenizer=str(tokenizer),
                  output_dir=str(tmp_path / "run"), held_out=0.1, steps=12, batch_size=8, lr=3e-3, dropout=0.1,
                  eval_every_steps=6, max_eval_blocks=16, seed=3, device="cpu", precision="fp32")
    fields.update(overrides)
    return PretrainConfig(**fields)


def run(config: PretrainConfig) -> Pretrainer:
    trainer = Pretrainer(config)
    trainer.run()
    return trainer


def log_of(config: PretrainConfig) -> dict:
    return json.loads((config.run_dir / "log.json").read_text())


@pytest.fixture(scope="module")
def pretrained_toy(tmp_path_factory):
    """The toy GPT-2 pretrained for 150 steps on the grammar's text."""
    config = small_config(tmp_path_factory.mktemp("pretrained"), steps=150, eval_every_steps=50, warmup_ratio=0.1)
    return config, pretrain(config)


@pytest.mark.slow  # 150 steps
def test_pretraining_lowers_the_held_out_loss(pretrained_toy):
    config, final = pretrained_toy
    history = log_of(config)["history"]
    assert [entry["step"] for entry in history] == [0, 50, 100, 150]
    untrained, trained = history[0]["held_out_loss"], history[-1]["held_out_loss"]
    assert untrained == pytest.approx(torch.log(torch.tensor(269.0)).item(), abs=0.3)  # near uniform at GPT-2's init
    assert trained < untrained - 3.0, history  # the grammar's text is far from uniform
    assert final["held_out_ppl"] == pytest.approx(torch.exp(torch.tensor(trained)).item(), rel=1e-6)
    assert final["best_step"] == 150


def memorise_grammar_text(model: GPT2Model, tokenizer: GPT2Tokenizer, layer: int, length: int):
    """The ReFT paper's memorisation test, scaled down: a rank-1 LoReFT at the last prompt token (a one-token
    prompt, <|endoftext|>) of one layer trained until greedy decoding continues with the first `length` tokens of a
    grammar document the pretraining never saw."""
    rng = random.Random(12345)
    text = " ".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(ADJECTIVES)}." for _ in range(8))
    model.set_dropout(0.0)
    apply_method(model, MethodConfig("loreft", rank=1, layers=[layer], positions="l1"))
    return memorise(model, [tokenizer.eos_token_id], tokenizer.encode(text)[:length], steps=MEMORISE_STEPS, lr=2e-2)


# Measured: pretrained as below (a few seconds; held-out perplexity 1.5, the grammar's choices are what is left), on
# either layer the model reproduced the first 8 tokens exactly within 25 steps (and all 16 of 16 on layer 0, 8 of 16
# on layer 1 in 300 steps: a rank-1 edit of one state carries a few sentences' choices); the random model of the
# same shape recovered 1 of the 8 and its loss stayed near uniform's (log 269 = 5.6) after 300 steps: its
# near-uniform logits give a one-dimensional edit of one state nothing to steer.
MEMORISE_STEPS = 300


@pytest.fixture(scope="module")
def grammar_model(tmp_path_factory) -> PretrainConfig:
    """A toy GPT-2 pretrained (200 steps, no dropout) until the grammar's text is nearly predictable."""
    tmp_path = tmp_path_factory.mktemp("grammar")
    write_text(tmp_path / "text.txt", documents=2000)
    config = small_config(tmp_path, n_embd=64, steps=200, eval_every_steps=200, dropout=0.0)
    pretrain(config)
    return config


@pytest.mark.slow  # two memorisation runs of up to 300 steps per layer
@pytest.mark.parametrize("layer", [0, 1])
def test_the_pretrained_model_memorises_a_text_the_random_one_of_its_shape_cannot(grammar_model, layer):
    config = grammar_model
    tokenizer = GPT2Tokenizer.from_pretrained(config.run_dir / "best")
    pretrained = memorise_grammar_text(GPT2Model.from_pretrained(str(config.run_dir / "best")), tokenizer, layer, 8)
    torch.manual_seed(0)
    random_model = GPT2Model(read_config(config.run_dir / "best" / "config.json"))
    random_outcome = memorise_grammar_text(random_model, tokenizer, layer, 8)
    assert pretrained.exact, f"pretrained: {pretrained.recovered}/8 tokens after {pretrained.steps} steps"
    assert random_outcome.recovered <= 2 and random_outcome.steps == MEMORISE_STEPS, random_outcome


def test_the_checkpoint_reloads_exactly_with_its_tokenizer(tmp_path):
    config = small_config(tmp_path, eval_every_steps=12)  # evaluated at 0 and 12 only: best is the final model
    trainer = run(config)
    assert log_of(config)["best"]["step"] == 12
    best = config.run_dir / "best"
    reloaded = GPT2Model.from_pretrained(str(best))
    assert reloaded.config.n_positions == 32 and reloaded.config.vocab_size == 269 and reloaded.config.n_layer == 2
    trained = {name: t for name, t in trainer.model.state_dict().items()}
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert GPT2Tokenizer.from_pretrained(best).fingerprint() == trainer.tokenizer.fingerprint()


@pytest.mark.slow  # imports transformers
def test_the_checkpoint_loads_in_transformers_with_equal_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = small_config(tmp_path, eval_every_steps=12)
    trainer = run(config)
    hf = transformers.GPT2LMHeadModel.from_pretrained(config.run_dir / "best").eval()
    ids = trainer.corpus.held_out[:2]
    ours = trainer.model.eval()
    with torch.no_grad():
        expected = ours.hidden_state_to_token(ours(ids)["last_hidden_state"])
        torch.testing.assert_close(hf(ids).logits, expected, atol=1e-5, rtol=1e-5)


def interrupt_at_step(monkeypatch, step: int):
    """Makes pretraining raise KeyboardInterrupt (as Ctrl-C would) just before optimizer step `step` (1-based)."""
    real_step = Pretrainer.train_step
    count = {"steps": 0}

    def train_step(self):
        count["steps"] += 1
        if count["steps"] == step:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Pretrainer, "train_step", train_step)


def test_a_resumed_run_is_bit_identical_to_an_uninterrupted_one(tmp_path, monkeypatch):
    # Dropout on and gradient accumulation: the RNG state, the optimizer and the block order all have to resume.
    options = dict(save_every_steps=4, grad_accum=2, batch_size=4)
    whole = small_config(tmp_path, output_dir=str(tmp_path / "whole"), **options)
    run(whole)
    parts = small_config(tmp_path, output_dir=str(tmp_path / "parts"), **options)
    with monkeypatch.context() as patch:
        interrupt_at_step(patch, 7)
        with pytest.raises(KeyboardInterrupt):
            run(parts)
    assert log_of(parts)["status"] == "interrupted"
    assert torch.load(ckpt.checkpoint_path(parts.run_dir), weights_only=True)["progress"]["step"] == 4
    run(small_config(tmp_path, output_dir=str(tmp_path / "parts"), resume=True, **options))

    a, b = load_file(whole.run_dir / "best" / "model.safetensors"), load_file(parts.run_dir / "best" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    timing = ("train_seconds", "tokens_per_second")
    strip = lambda log: [{k: v for k, v in entry.items() if k not in timing} for entry in log["history"]]
    assert strip(log_of(parts)) == strip(log_of(whole))
    assert log_of(parts)["status"] == "finished"


def test_resume_refuses_other_settings_and_a_run_dir_in_use(tmp_path, capsys):
    config = small_config(tmp_path, steps=4, eval_every_steps=4)
    run(config)
    again = ["--preset", "tiny", "--n-embd", "32", "--n-layer", "2", "--n-head", "2", "--context", "32", "--text",
             config.texts[0], "--tokenizer", config.tokenizer, "--output-dir", str(config.run_dir), "--steps", "4",
             "--held-out", "0.1", "--seed", "3", "--device", "cpu", "--precision", "fp32", "--eval-every-steps", "4",
             "--max-eval-blocks", "16", "--batch-size", "8", "--dropout", "0.1"]
    assert main(again) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(again + ["--resume", "--lr", "0.01"]) == 1
    err = capsys.readouterr().err
    assert "was made by a different run" in err and "lr: checkpoint 0.003, now 0.01" in err
    lock = ckpt.RunLock(config.run_dir).acquire()
    try:
        assert main(again + ["--overwrite"]) == 1
        assert "is in use by another run" in capsys.readouterr().err
    finally:
        lock.release()


def test_bad_input_is_one_clear_error(tmp_path, capsys):
    tokenizer = str(write_tiny_tokenizer(tmp_path / "tokenizer"))
    short = tmp_path / "short.txt"
    short.write_text("the film is good.\n", encoding="utf-8")
    base = ["--tokenizer", tokenizer, "--output-dir", str(tmp_path / "run"), "--device", "cpu", "--preset", "tiny"]
    assert main(base + ["--text", str(short)]) == 1
    assert f"{short}: too little text for one training block of --context 1024 tokens" in capsys.readouterr().err
    assert main(base + ["--text", str(tmp_path / "missing.txt")]) == 1
    assert f"{tmp_path / 'missing.txt'}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--held-out", "1.5"])
    assert "--held-out: must be in (0, 1)" in capsys.readouterr().err


def test_the_default_texts_are_the_course_training_files_only(tmp_path):
    data = write_data_dir(tmp_path / "data")
    tokenizer = GPT2Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path / "tokenizer"))
    corpus = build_corpus(PretrainConfig(data_dir=str(data), held_out=0.2), tokenizer, context=8)
    assert corpus.sources == [str(default_paths(task, data)["train"]) for task in ("sst", "cfimdb", "quora", "sonnet")]
    assert corpus.train.shape[1] == 8 and len(corpus.held_out) > 0


def test_the_held_out_split_follows_the_text_not_the_seed_or_order():
    texts = [f"document {i}" for i in range(2000)]
    held = [t for t in texts if is_held_out(t, 0.05)]
    assert 60 <= len(held) <= 140  # about 5%
    assert held == [t for t in reversed(texts) if is_held_out(t, 0.05)][::-1]
