"""data.readers: the real development files, every error with its path:line, skipping, and the writers."""
from __future__ import annotations

import csv
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from data import readers
from data.readers import (
    PARAPHRASE_COLUMN,
    SENTIMENT_COLUMN,
    DataFormatError,
    MalformedRowsWarning,
    ParaphraseExample,
    SentimentExample,
    Sonnet,
    default_paths,
    read_paraphrase,
    read_predictions,
    read_sentiment,
    read_sonnets,
    write_paraphrase,
    write_predictions,
    write_sentiment,
    write_sonnets,
)

SHARED_DIR = Path(os.environ.get("GPT2_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared"))
SHARED_DATA = SHARED_DIR / "data"
requires_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "ids-sst-train.csv").is_file(),
    reason=f"development data not found at {SHARED_DATA} (set GPT2_SHARED_DIR to the folder holding data/)",
)


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@contextmanager
def raises_at(path: Path, line: int, *fragments: str):
    """Expects a DataFormatError whose message starts with `path:line:` and names each fragment."""
    with pytest.raises(DataFormatError) as info:
        yield info
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: " if line else f"{path}: "), message
    assert info.value.line == line
    for fragment in fragments:
        assert fragment in message, (fragment, message)


# ---------------------------------------------------------------------------------------------- real files


@requires_shared_data
@pytest.mark.parametrize("task, split, count", [
    ("sst", "train", 8544), ("sst", "dev", 1101), ("sst", "test", 2210),
    ("cfimdb", "train", 1707), ("cfimdb", "dev", 245), ("cfimdb", "test", 488),
])
def test_real_sentiment_files(task, split, count):
    examples = read_sentiment(default_paths(task, SHARED_DATA)[split], labels=readers.SENTIMENT_LABELS[task],
                              require_labels=split != "test")
    assert len(examples) == count
    assert len({e.id for e in examples}) == count
    assert all(len(e.id) == 25 and e.text == e.text.strip() and e.text for e in examples)
    labels = {e.label for e in examples}
    assert labels == ({None} if split == "test" else set(readers.SENTIMENT_LABELS[task]))


@requires_shared_data
def test_real_sample_values():
    paths = default_paths("sst", SHARED_DATA)
    first = read_sentiment(paths["train"], labels=range(5))[0]
    assert first == SentimentExample(
        "32a4f146782cbde1b7fa65799",
        "The Rock is destined to be the 21st Century 's new `` Conan '' and that he 's going to make a splash even "
        "greater than Arnold Schwarzenegger , Jean-Claud Van Damme or Steven Segal .", 3)
    # The test-student layout: a double index (`0\t\tid\tsentence`) and no labels.
    test = read_sentiment(paths["test"], require_labels=False)
    assert test[0] == SentimentExample("b7573736a6ddf7be102b7fee0", "Effective but too-tepid biopic", None)
    assert test[-1].id == "95d5aedb8dbdfdcb4705f5e14"
    dev = read_paraphrase(default_paths("quora", SHARED_DATA)["dev"])
    assert dev[0] == ParaphraseExample("2fb7793ba119a1b1459b5666e",
                                       "How would you use the word \u201cpillage\u201d in a sentence?",
                                       "How would you use the word 'compelling' in a sentence?", 0)


@requires_shared_data
@pytest.mark.parametrize("split, count, positives", [("train", 16000, 6004), ("dev", 2000, 742)])
def test_real_quora_files(split, count, positives):
    examples = read_paraphrase(default_paths("quora", SHARED_DATA)[split])
    assert len(examples) == count
    assert sum(e.label for e in examples) == positives


@requires_shared_data
@pytest.mark.parametrize("name, column", [
    ("ids-cfimdb-train.csv", "sentence"), ("ids-cfimdb-test-student.csv", "sentence"),
    ("quora-train.csv", "sentence1"), ("quora-dev.csv", "sentence2"),
])
def test_real_texts_match_the_course_reader(name, column):
    # Files with several layers of CSV quoting must read exactly as the course's csv.DictReader reads them.
    with open(SHARED_DATA / name, encoding="utf-8", newline="") as handle:
        course = [row[column].strip() for row in csv.DictReader(handle, delimiter="\t")]
    if name.startswith("quora"):
        ours = [getattr(e, column) for e in read_paraphrase(SHARED_DATA / name)]
    else:
        ours = [e.text for e in read_sentiment(SHARED_DATA / name, require_labels=False)]
    assert ours == course
    assert sum('"' in text for text in ours) > 20  # the quoted rows are really exercised


@requires_shared_data
def test_real_sonnets():
    paths = default_paths("sonnet", SHARED_DATA)
    train = read_sonnets(paths["train"])
    assert [s.number for s in train] == list(range(1, 132))
    assert len(train[0].lines) == 14 and train[0].lines[0] == "From fairest creatures we desire increase,"
    assert train[0].lines[-1] == "  To eat the world's due, by the grave and thee."  # couplet indent kept
    assert len(train[98].lines) == 15 and len(train[125].lines) == 12  # sonnets 99 and 126
    assert not any(line.endswith("\r") for s in train for line in s.lines)
    dev, true_dev, test = (read_sonnets(paths[k]) for k in ("dev", "dev_true", "test"))
    assert [s.number for s in dev] == [s.number for s in true_dev] == list(range(132, 144))
    assert [s.number for s in test] == list(range(145, 157))
    assert all(len(s.lines) == 3 for s in dev + test)
    assert all(d.lines == t.lines[:3] and len(t.lines) == 14 for d, t in zip(dev, true_dev))


# ---------------------------------------------------------------------------------------------- errors

SST_HEADER = "\tid\tsentence\tsentiment\n"


def test_missing_and_empty_files(tmp_path):
    with raises_at(tmp_path / "nope.csv", 0, "file not found"):
        read_sentiment(tmp_path / "nope.csv")
    with raises_at(tmp_path / "nope.txt", 0, "file not found"):
        read_sonnets(tmp_path / "nope.txt")
    empty = write(tmp_path / "empty.csv", "")
    with raises_at(empty, 1, "empty file"):
        read_sentiment(empty)
    with raises_at(empty, 1, "empty file"):
        read_predictions(empty)
    header_only = write(tmp_path / "header.csv", SST_HEADER)
    with raises_at(header_only, 2, "no data rows"):
        read_sentiment(header_only)


def test_missing_columns_named_with_the_header_found(tmp_path):
    path = write(tmp_path / "s.csv", "\tid\ttext\n0\ta\thello\n")
    with raises_at(path, 1, "'sentence'", "'sentiment'", "header found: ['', 'id', 'text']"):
        read_sentiment(path)
    quora = write(tmp_path / "q.csv", "\tid\tsentence1\tsentence2\n0\ta\tx\ty\n")
    with raises_at(quora, 1, "'is_duplicate'"):
        read_paraphrase(quora)
    assert read_paraphrase(quora, require_labels=False)[0].label is None


@pytest.mark.parametrize("row, problem", [
    ("1\tb\tfine\t2\textra", "expected 4 tab-separated fields as in the header, found 5"),
    ("1\tb\tshort", "found 3"),
    ("1\tb\t   \t2", "empty sentence"),
    ("1\t\ttext\t2", "empty id"),
    ("1\tb,c\ttext\t2", "id 'b,c' contains a comma, which the prediction files (`<id>, <prediction>`) cannot hold"),
    ('1\t"b,c"\ttext\t2', "id 'b,c' contains a comma"),
    ("1\tb\ttext\t3.5", "unknown label '3.5'"),
    ("1\tb\ttext\tx", "unknown label 'x'"),
    ("1\tb\ttext\t7", "unknown label '7' in column 'sentiment' (allowed: 0, 1, 2, 3, 4)"),
    ("1\tb\ttext\t", "missing label"),
    ("1\ta\tagain\t2", "duplicate id 'a' (first on line 2)"),
])
def test_row_errors_name_path_and_line(tmp_path, row, problem):
    path = write(tmp_path / "bad.csv", SST_HEADER + "0\ta\tgood\t1\n" + row + "\n")
    with raises_at(path, 3, problem):
        read_sentiment(path, labels=range(5))


def test_label_spellings(tmp_path):
    path = write(tmp_path / "s.csv", SST_HEADER + "0\ta\tx\t3\n1\tb\ty\t3.0\n2\tc\tz\t 4 \n")
    assert [e.label for e in read_sentiment(path, labels=range(5))] == [3, 3, 4]
    assert read_sentiment(path)[0].label == 3  # labels=None: any integer
    binary = write(tmp_path / "b.csv", SST_HEADER + "0\ta\tx\t2\n")
    with raises_at(binary, 2, "unknown label '2'", "allowed: 0, 1"):
        read_sentiment(binary, labels=(0, 1))
    quora = write(tmp_path / "q.csv", "\tid\tsentence1\tsentence2\tis_duplicate\n0\ta\tx\ty\t1.0\n1\tb\tx\ty\t0\n"
                                      "2\tc\tx\ty\t2.0\n")
    with raises_at(quora, 4, "unknown label '2.0'"):
        read_paraphrase(quora)


def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "s.csv"
    path.write_bytes(SST_HEADER.encode() + b"0\ta\tgood\t1\n1\tb\tbad \xff\t2\n")
    with raises_at(path, 3, "not valid UTF-8"):
        read_sentiment(path)


def test_quoting_matches_the_files(tmp_path):
    # A CSV-quoted field loses one layer of quoting; stray quotes are literal and never swallow later rows.
    rows = ['0\ta\t"He said ""hi"""\t1', '1\tb\tA 5" screen\t0', '2\tc\t"unbalanced start\t1', "3\td\tplain\t0"]
    path = write(tmp_path / "q.csv", SST_HEADER + "\n".join(rows) + "\n")
    assert [e.text for e in read_sentiment(path)] == ['He said "hi"', 'A 5" screen', '"unbalanced start', "plain"]


def test_crlf_bom_and_blank_lines(tmp_path):
    path = tmp_path / "s.csv"
    rows = b"0\ta\t x \t1\r\n\r\n1\tb\ty\t0\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + SST_HEADER.replace("\n", "\r\n").encode() + rows)
    assert read_sentiment(path) == [SentimentExample("a", "x", 1), SentimentExample("b", "y", 0)]


def test_skip_malformed_counts_and_warns(tmp_path):
    rows = ["0\ta\tgood\t1", "1\tb\t\t2", "2\tc\tfine\t0", "3\td\tbad\t9", "4\ta\tdup\t1", "5\te\tok\t4"]
    path = write(tmp_path / "s.csv", SST_HEADER + "\n".join(rows) + "\n")
    with pytest.warns(MalformedRowsWarning) as caught:
        examples = read_sentiment(path, labels=range(5), skip_malformed=True)
    assert [e.id for e in examples] == ["a", "c", "e"]
    [warning] = caught
    message = str(warning.message)
    assert str(path) in message and "skipped 3 malformed row(s) of 6" in message and "lines 3, 5, 6" in message
    assert "first problem: " in message and "empty sentence" in message
    # File-level problems are never skipped.
    with raises_at(tmp_path / "none.csv", 0, "file not found"):
        read_sentiment(tmp_path / "none.csv", skip_malformed=True)


def test_clean_file_reports_nothing_and_does_not_warn(tmp_path, recwarn):
    path = write(tmp_path / "s.csv", SST_HEADER + "0\ta\tgood\t1\n")
    examples = read_sentiment(path, skip_malformed=True)
    assert len(examples) == 1 and len(recwarn) == 0


# ---------------------------------------------------------------------------------------------- writers


def test_tables_round_trip(tmp_path):
    examples = [SentimentExample("a", 'He said "hi"', 4), SentimentExample("b", '"Quoted"', 0),
                SentimentExample("c", "plain , text", 2)]
    write_sentiment(tmp_path / "out" / "s.csv", examples)
    assert read_sentiment(tmp_path / "out" / "s.csv", labels=range(5)) == examples
    unlabelled = [SentimentExample(e.id, e.text, None) for e in examples]
    write_sentiment(tmp_path / "t.csv", unlabelled)
    assert (tmp_path / "t.csv").read_text().startswith("\tid\tsentence\n")
    assert read_sentiment(tmp_path / "t.csv", require_labels=False) == unlabelled
    pairs = [ParaphraseExample("1", 'What is "x"?', "y", 1), ParaphraseExample("2", "a", "b", 0)]
    write_paraphrase(tmp_path / "q.csv", pairs)
    assert "\t1.0\n" in (tmp_path / "q.csv").read_text()
    assert read_paraphrase(tmp_path / "q.csv") == pairs
    with pytest.raises(ValueError, match="tab or line break"):
        write_sentiment(tmp_path / "x.csv", [SentimentExample("a", "two\nlines", 1)])
    with pytest.raises(ValueError, match="every example has a label or none"):
        write_sentiment(tmp_path / "x.csv", [SentimentExample("a", "x", 1), SentimentExample("b", "y", None)])


def test_prediction_file_format_and_round_trip(tmp_path):
    path = tmp_path / "predictions" / "full-sst-dev-out.csv"
    write_predictions(path, SENTIMENT_COLUMN, ["a1", "b2", "c3"], [3, np.int64(0), 4])
    assert path.read_text() == "id \t Predicted_Sentiment \na1, 3 \nb2, 0 \nc3, 4 \n"
    assert read_predictions(path) == {"a1": 3, "b2": 0, "c3": 4}
    assert read_predictions(path, SENTIMENT_COLUMN) == {"a1": 3, "b2": 0, "c3": 4}
    with raises_at(path, 1, "Predicted_Is_Paraphrase"):
        read_predictions(path, PARAPHRASE_COLUMN)
    para = tmp_path / "para.csv"
    write_predictions(para, PARAPHRASE_COLUMN, ("x", "y"), ["yes", 8505])
    assert para.read_text() == "id \t Predicted_Is_Paraphrase \nx, yes \ny, 8505 \n"
    assert read_predictions(para) == {"x": "yes", "y": 8505}
    # No temporary files left behind.
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["full-sst-dev-out.csv", "para.csv", "predictions"]


def test_read_predictions_errors(tmp_path):
    path = write(tmp_path / "p.csv", "id \t Predicted_Sentiment \na , 1 \nb 2 \n")
    with raises_at(path, 3, "expected '<id>, <prediction>'"):
        read_predictions(path)
    dup = write(tmp_path / "d.csv", "id \t Predicted_Sentiment \na , 1 \na , 2 \n")
    with raises_at(dup, 3, "duplicate id 'a' (first on line 2)"):
        read_predictions(dup)
    bad_header = write(tmp_path / "h.csv", "sentence \t Predicted_Sentiment \n")
    with raises_at(bad_header, 1, "expected the header"):
        read_predictions(bad_header)


def test_write_predictions_refuses_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2 ids but 1 predictions"):
        write_predictions(tmp_path / "p.csv", SENTIMENT_COLUMN, ["a", "b"], [1])
    with pytest.raises(ValueError, match="free of commas"):
        write_predictions(tmp_path / "p.csv", SENTIMENT_COLUMN, ["a,b"], [1])
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "p.csv"
    write_predictions(path, SENTIMENT_COLUMN, ["old"], [1])
    before = path.read_bytes()

    def predictions():
        yield 1
        yield 2
        raise RuntimeError("model crashed midway")

    with pytest.raises(RuntimeError, match="midway"):
        write_predictions(path, SENTIMENT_COLUMN, ["a", "b", "c"], predictions())
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]

    # A failure in the final rename (e.g. the disk filling up) also leaves the old file and no temp file.
    def failing_replace(source, target):
        raise OSError("no space left on device")

    monkeypatch.setattr(readers.os, "replace", failing_replace)
    with pytest.raises(OSError, match="no space"):
        write_sonnets(path, [Sonnet(1, "text")])
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


# ---------------------------------------------------------------------------------------------- sonnets


def test_sonnets_round_trip_in_the_course_format(tmp_path):
    texts = {132: "Thine eyes I love,\nKnowing thy heart\n  a couplet line", 7: "one line"}
    path = tmp_path / "generated.txt"
    write_sonnets(path, [Sonnet(132, texts[132]), (7, texts[7] + "\n")])
    assert path.read_text() == ("--Generated Sonnets-- \n\n\n132\nThine eyes I love,\nKnowing thy heart\n"
                                "  a couplet line\n7\none line\n")
    assert read_sonnets(path) == [Sonnet(132, texts[132]), Sonnet(7, texts[7])]


def test_sonnet_parsing_trims_and_keeps_structure(tmp_path):
    path = write(tmp_path / "s.txt",
                 "Sonnets\nby someone\n\n\n1\n\nfirst line  \r\nsecond\n\n  couplet\n\n\n2\n\nonly\n")
    first, second = read_sonnets(path)
    assert first == Sonnet(1, "first line\nsecond\n\n  couplet") and second == Sonnet(2, "only")


def test_sonnet_errors(tmp_path):
    none = write(tmp_path / "none.txt", "just a header\nno numbers\n")
    with raises_at(none, 1, "no sonnets found"):
        read_sonnets(none)
    dup = write(tmp_path / "dup.txt", "1\na\n2\nb\n1\nc\n")
    with raises_at(dup, 5, "sonnet 1 appears twice (first on line 1)"):
        read_sonnets(dup)
    empty_sonnet = write(tmp_path / "e.txt", "header\n1\nline\n2\n\n\n3\nline\n")
    with raises_at(empty_sonnet, 4, "sonnet 2 has no text"):
        read_sonnets(empty_sonnet)
    blank = write(tmp_path / "blank.txt", "\n\n")
    with raises_at(blank, 1, "empty file"):
        read_sonnets(blank)


def test_write_sonnets_warns_about_number_only_lines(tmp_path):
    with pytest.warns(UserWarning, match="only a number"):
        write_sonnets(tmp_path / "g.txt", [Sonnet(1, "a line\n42\nanother")])


# ---------------------------------------------------------------------------------------------- paths


def test_default_paths(tmp_path):
    assert default_paths("sst", tmp_path) == {"train": tmp_path / "ids-sst-train.csv",
                                              "dev": tmp_path / "ids-sst-dev.csv",
                                              "test": tmp_path / "ids-sst-test-student.csv"}
    assert default_paths("cfimdb")["dev"] == Path("data/ids-cfimdb-dev.csv")
    assert default_paths("quora", tmp_path)["train"].name == "quora-train.csv"
    sonnet = default_paths("sonnet", tmp_path)
    assert {k: p.name for k, p in sonnet.items()} == {
        "train": "sonnets.txt", "dev": "sonnets_held_out_dev.txt", "dev_true": "TRUE_sonnets_held_out_dev.txt",
        "test": "sonnets_held_out.txt"}
    with pytest.raises(ValueError, match="unknown task 'imdb'"):
        default_paths("imdb")
