"""GPT2Tokenizer: exact ids on the real vocabulary, agreement with transformers' slow tokenizer, the tiny
vocabulary worked by hand, batching, and loading errors. No network."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import models.tokenizer as tokenizer_module
from models.tokenizer import GPT2Tokenizer, bytes_to_unicode
from tasks.config import TrainConfig
from tasks.trainer import tokenizer_source
from tests.fixtures.tiny_tokenizer import TINY_MERGES, write_tiny_tokenizer

SHARED_DIR = Path(os.environ.get("GPT2_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
REAL_TOKENIZER = SHARED_DIR / "gpt2-tokenizer"
DATA = SHARED_DIR / "data"

requires_real_vocab = pytest.mark.skipif(
    not (REAL_TOKENIZER / "merges.txt").is_file(),
    reason=f"real GPT-2 vocab.json/merges.txt not found at {REAL_TOKENIZER} (set GPT2_SHARED_DIR)")
requires_data = pytest.mark.skipif(
    not (DATA / "ids-sst-train.csv").is_file(), reason=f"development data not found at {DATA} (set GPT2_SHARED_DIR)")

HARD_CASES = [
    "", " ", "  ", "a", "Hello world, this is GPT-2!", "trailing spaces   ", "   leading spaces",
    "tabs\tand\t\tmore\ttabs", "line\nbreaks\n\n\nand\r\nwindows\r\n", "mixed \t\n \n  whitespace  \n",
    "it's I'm you're we've they'll he'd don't IT'S", "'s 't 're 've 'm 'll 'd", "rock 'n' roll, ''quoted''",
    "numbers 1234567890 3.14159 -42 1,000,000 2nd 10th", "punctuation!!! ??? ... --- (parens) [brackets] {braces} @#$%^&*",
    "naïve café résumé Ångström façade", "日本語のテキスト 中文文本 한국어", "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷",
    "Ελληνικά и русский текст", "zero\u200bwidth and\u00a0nbsp", "math ∑∫√∞ ≠ ≤ ≥", "control \x00\x01\x7f chars",
    "first part<|endoftext|>second part", "<|endoftext|> at the start", "at the end <|endoftext|>",
    "double<|endoftext|><|endoftext|>", "<|endoftext| not special", "URL https://example.com/a?b=c&d=e#f",
    "CamelCaseWords and snake_case_words", "Mr. O'Neil's dog's bone", "     many     spaces     ",
]


def real_sentences() -> list[str]:
    """A deterministic spread of a few hundred sentences from SST, CFIMDB, Quora and the sonnets."""
    def column(name, index, step):
        rows = (DATA / name).read_text(encoding="utf-8").splitlines()[1:]
        return [row.split("\t")[index] for row in rows[::step]]

    sonnet_lines = [line for line in (DATA / "sonnets.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    return (column("ids-sst-train.csv", 2, 40) + column("ids-cfimdb-dev.csv", 2, 25)
            + column("quora-dev.csv", 2, 20) + column("quora-dev.csv", 3, 20) + sonnet_lines[::10])


@pytest.fixture(scope="module")
def real():
    return GPT2Tokenizer.from_pretrained(REAL_TOKENIZER)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return GPT2Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("tiny")))


def reference_tokenizer(directory: Path):
    transformers = pytest.importorskip("transformers", reason="transformers (a test-only dependency) is not installed")
    return transformers.GPT2Tokenizer(vocab_file=str(directory / "vocab.json"), merges_file=str(directory / "merges.txt"),
                                      clean_up_tokenization_spaces=False)


# ---- byte alphabet ---------------------------------------------------------------------------------

def test_byte_alphabet():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord("~")] == "~" and table[0xE9] == "é"
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā" and table[0x7F] == "ġ"
    assert table[0xAD] == "Ń"  # the soft hyphen, the last non-printable byte


@requires_real_vocab
def test_real_vocab_starts_with_byte_alphabet():
    vocab = json.loads((REAL_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    assert [vocab[char] for char in bytes_to_unicode().values()] == list(range(256))


# ---- real vocabulary ---------------------------------------------------------------------------------

@requires_real_vocab
@pytest.mark.parametrize("text, ids", [
    ("Hello world, this is GPT-2!", [15496, 995, 11, 428, 318, 402, 11571, 12, 17, 0]),
    ("<|endoftext|>", [50256]), (" yes", [3763]), (" no", [645]), ("yes", [8505]), ("no", [3919]), ("", []),
])
def test_known_ids(real, text, ids):
    assert real.encode(text) == ids


@requires_real_vocab
def test_real_properties(real):
    assert real.eos_token_id == 50256 and real.pad_token_id == 50256
    assert real.vocab_size == len(real) == 50257


@requires_real_vocab
@requires_data
def test_matches_transformers_slow_tokenizer(real):
    reference = reference_tokenizer(REAL_TOKENIZER)
    texts = real_sentences() + HARD_CASES
    assert len(texts) > 400
    for text in texts:
        assert real.encode(text) == reference.encode(text), text


@requires_real_vocab
@requires_data
def test_real_round_trip(real):
    for text in real_sentences() + HARD_CASES:
        assert real.decode(real.encode(text)) == text


# ---- tiny vocabulary, worked by hand ---------------------------------------------------------------

@pytest.mark.parametrize("text, ids", [
    ("the yes no\n\n", [83, 257, 263, 260, 267]),  # "the" has no merge for "t"+"he": t, he
    (" the", [258]), ("yes", [262]), ("no", [259]), (" is a", [266, 264]), ("\n", [198]),
    ("\n\n\n", [267, 198]),  # merges are applied left to right without overlap
    ("yes<|endoftext|>no", [262, 268, 259]),
    ("note", [259, 83, 68]),  # "no" merges; nothing merges "t"+"e"
    ("é", [127, 102]),  # UTF-8 bytes 0xC3 0xA9 -> "Ã" (id 127) and "©" (id 102), as in the real vocabulary
    ("", []),
])
def test_tiny_ids(tiny, text, ids):
    assert tiny.encode(text) == ids


def test_tiny_vocab_layout(tiny):
    assert tiny.vocab_size == len(tiny) == 256 + len(TINY_MERGES) + 1
    assert tiny.eos_token_id == tiny.pad_token_id == tiny.vocab_size - 1


def test_tiny_matches_transformers(tmp_path, tiny):
    reference = reference_tokenizer(write_tiny_tokenizer(tmp_path))
    for text in HARD_CASES + ["the yes no\n\n", "yes no the is a\n\n\n\nyes"]:
        assert tiny.encode(text) == reference.encode(text), text


def test_tiny_round_trip(tiny):
    for text in HARD_CASES:
        assert tiny.decode(tiny.encode(text)) == text


def test_word_cache_runs_bpe_once_per_distinct_word(tmp_path):
    tokenizer = GPT2Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))
    seen = []
    original = tokenizer._bpe
    tokenizer._bpe = lambda word: seen.append(word) or original(word)
    assert tokenizer.encode("yes yes yes no no") == [262, 263, 263, 260, 260]
    assert seen == ["yes", "Ġyes", "Ġno"]


def test_cache_limit_keeps_results_correct(tmp_path, monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_CACHE_LIMIT", 2)
    tokenizer = GPT2Tokenizer.from_pretrained(write_tiny_tokenizer(tmp_path))
    text = "the yes no is a the yes no"
    assert tokenizer.encode(text) == tokenizer.encode(text) == [83, 257, 263, 260, 266, 264, 258, 263, 260]
    assert len(tokenizer._cache) <= 2


def test_decode_invalid_utf8_is_replaced(tiny):
    emoji = tiny.encode("😀")  # four byte tokens
    assert len(emoji) == 4
    assert tiny.decode(emoji[:2]) == "\ufffd"  # half a character
    assert tiny.decode([127]) == "\ufffd"  # a lone UTF-8 lead byte (0xC3)
    assert tiny.decode(emoji[:2] + tiny.encode(" yes")) == "\ufffd yes"


def test_decode_accepts_tensors_and_rejects_unknown_ids(tiny):
    assert tiny.decode(torch.tensor([262, 268])) == "yes<|endoftext|>"
    with pytest.raises(ValueError, match="token id 269"):
        tiny.decode([262, 269])


def test_encode_rejects_non_strings(tiny):
    with pytest.raises(ValueError, match="text must be a str"):
        tiny.encode(b"yes")


# ---- loading ---------------------------------------------------------------------------------------

def test_from_files_equals_from_pretrained(tmp_path, tiny):
    directory = write_tiny_tokenizer(tmp_path)
    from_files = GPT2Tokenizer.from_files(directory / "vocab.json", directory / "merges.txt")
    assert from_files.encode(" the yes") == tiny.encode(" the yes") == [258, 263]


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json and merges.txt"):
        GPT2Tokenizer.from_pretrained(tmp_path / "nowhere")


def test_directory_without_merges(tmp_path):
    (write_tiny_tokenizer(tmp_path) / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        GPT2Tokenizer.from_pretrained(tmp_path)


def test_invalid_json(tmp_path):
    (write_tiny_tokenizer(tmp_path) / "vocab.json").write_text('{"a": 1,', encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json is not valid JSON"):
        GPT2Tokenizer.from_pretrained(tmp_path)


def test_vocab_of_wrong_shape(tmp_path):
    (write_tiny_tokenizer(tmp_path) / "vocab.json").write_text('["a", "b"]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.json must be a JSON object"):
        GPT2Tokenizer.from_pretrained(tmp_path)


def test_vocab_without_eos(tmp_path):
    directory = write_tiny_tokenizer(tmp_path)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    del vocab["<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="<|endoftext|>"):
        GPT2Tokenizer.from_pretrained(directory)


@pytest.mark.parametrize("bad_line, message", [
    ("y e s", "line 3: expected two symbols"),
    ("ye", "line 3: expected two symbols"),
    ("q z", r"line 3: 'qz' is not a token"),
])
def test_malformed_merges(tmp_path, bad_line, message):
    directory = write_tiny_tokenizer(tmp_path)
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    lines.insert(2, bad_line)
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as error:
        GPT2Tokenizer.from_pretrained(directory)
    assert "merges.txt" in str(error.value)


def test_tokenizer_defaults_to_the_model_directory_when_it_has_one(tmp_path):
    from tests.fixtures.tiny_tokenizer import write_tiny_tokenizer

    write_tiny_tokenizer(tmp_path / "model")
    assert tokenizer_source(TrainConfig(task="sst", model=str(tmp_path / "model"))) == str(tmp_path / "model")
    assert tokenizer_source(TrainConfig(task="sst", model=str(tmp_path))) == "gpt2"
    assert tokenizer_source(TrainConfig(task="sst", model="random:tiny", tokenizer="tok")) == "tok"


def test_hub_name_downloads_both_files(tmp_path, monkeypatch):
    directory = write_tiny_tokenizer(tmp_path)
    requested = []

    def fake_download(name, filename):
        requested.append((name, filename))
        return directory / filename

    monkeypatch.setattr(tokenizer_module.hub, "hub_download", fake_download)
    tokenizer = GPT2Tokenizer.from_pretrained("gpt2-medium")
    assert sorted(requested) == [("gpt2-medium", "merges.txt"), ("gpt2-medium", "vocab.json")]
    assert tokenizer.encode(" yes") == [263]
