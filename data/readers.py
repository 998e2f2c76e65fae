"""Readers and writers for the CS224n GPT-2 project's file formats.

Data tables are tab-separated with an unnamed row-index column first; columns are found by header name, so
the usual `\\tid\\tsentence\\tsentiment` header and the test-student files' double index
(`0\\t\\tid\\tsentence`, rows `1\\t0.0\\t<id>\\t<sentence>`) both read. Every physical line is one row
(QUOTE_NONE splitting, so a stray quote can never swallow the rows after it); a field that is wrapped in
CSV quotes (`"..."` with inner quotes doubled) then loses that one layer of quoting. That yields exactly the
text the course's starter code (`csv.DictReader(f, delimiter="\\t")`) reads from the distributed files. Some
of those carry several layers of CSV quoting (a Quora question with a quoted word is stored with its quotes
quadrupled); they read with one layer less, as the course's code saw them, so results stay comparable.

Problems raise `DataFormatError`, whose message starts with `<path>:<line>:`. All writes are atomic.
"""
from __future__ import annotations

import csv
import io
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar, Union

from data.atomic import atomic_write

PathLike = Union[str, "os.PathLike[str]"]

# Long CFIMDB reviews exceed the csv module's default 128 KiB field limit only in pathological files, but a
# limit error would be a confusing way to find out.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))

TASK_FILES: dict[str, dict[str, str]] = {
    "sst": {"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv", "test": "ids-sst-test-student.csv"},
    "cfimdb": {"train": "ids-cfimdb-train.csv", "dev": "ids-cfimdb-dev.csv", "test": "ids-cfimdb-test-student.csv"},
    # The course's Quora test file; neither ../shared/data nor `python -m data.download` provides it.
    "quora": {"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"},
    "sonnet": {
        "train": "sonnets.txt",
        "dev": "sonnets_held_out_dev.txt",  # first three lines of sonnets 132-143: the generation prompts
        "dev_true": "TRUE_sonnets_held_out_dev.txt",  # the same sonnets in full: the chrF references
        "test": "sonnets_held_out.txt",
    },
}
SENTIMENT_LABELS: dict[str, tuple[int, ...]] = {"sst": (0, 1, 2, 3, 4), "cfimdb": (0, 1)}
SENTIMENT_COLUMN = "Predicted_Sentiment"
PARAPHRASE_COLUMN = "Predicted_Is_Paraphrase"
SONNETS_HEADER = "--Generated Sonnets-- \n\n"


def default_paths(task: str, data_dir: PathLike = "data") -> dict[str, Path]:
    """The data files of `task` ("sst", "cfimdb", "quora", "sonnet") under `data_dir`, keyed by split:
    "train", "dev", "test", and for sonnets also "dev_true" (the full held-out dev sonnets)."""
    if task not in TASK_FILES:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_FILES)}")
    return {split: Path(data_dir) / name for split, name in TASK_FILES[task].items()}


class DataFormatError(ValueError):
    """A data or prediction file that cannot be used. `line` is 1-based; 0 means the file as a whole."""

    def __init__(self, path: PathLike, line: int, problem: str):
        self.path, self.line, self.problem = Path(path), line, problem
        super().__init__(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")


class MalformedRowsWarning(UserWarning):
    """Rows were skipped because the caller asked for `skip_malformed=True`."""


@dataclass(frozen=True, slots=True)
class SentimentExample:
    id: str
    text: str
    label: Optional[int]


@dataclass(frozen=True, slots=True)
class ParaphraseExample:
    id: str
    sentence1: str
    sentence2: str
    label: Optional[int]


@dataclass(frozen=True)
class Sonnet:
    number: int
    text: str

    @property
    def lines(self) -> list[str]:
        return self.text.split("\n")


@dataclass
class ReadReport:
    """How reading a table went, for the MalformedRowsWarning: data rows seen and the (line, problem) of each
    skipped one."""

    path: Path
    rows: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)


T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- reading


class _BadRow(Exception):
    """A row-level problem; `skip_malformed` decides whether it is fatal."""


def check_file(path: Path) -> None:
    """A clear DataFormatError when `path` is missing or not a file."""
    if not path.exists():
        where = "directory does not exist" if not path.parent.is_dir() else "file not found"
        raise DataFormatError(path, 0, f"{where} (point --data-dir at the folder with the course's files, run `python -m data.download --data-dir "
                                       f"{path.parent}`, or copy the course's files in)")
    if not path.is_file():
        raise DataFormatError(path, 0, "not a regular file")


def _unquote(value: str) -> str:
    """Removes one layer of CSV quoting from a field that is entirely quoted, as csv.DictReader would."""
    if len(value) >= 2 and value[0] == value[-1] == '"':
        inner = value[1:-1]
        if '"' not in inner.replace('""', ""):
            return inner.replace('""', '"')
    return value


def _decoded(path: Path) -> str:
    """The file's text (UTF-8, optional BOM); a decoding error names the line it is on."""
    check_file(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataFormatError(path, line, f"not valid UTF-8 ({error.reason} at byte {error.start})") from None


def _physical_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of each non-blank line, split on tabs without any quote handling."""
    reader = csv.reader(io.StringIO(_decoded(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        for fields in reader:
            if any(fields):
                yield reader.line_num, fields
    except csv.Error as error:
        raise DataFormatError(path, reader.line_num, f"unreadable line ({error})") from None


def _read_table(
    path: PathLike,
    required: Sequence[str],
    optional: Sequence[str],
    make: Callable[[dict[str, str]], T],
    skip_malformed: bool,
) -> list[T]:
    """Rows of a tab-separated table as `make({column: stripped value})`, with duplicate ids refused."""
    path = Path(path)
    rows = _physical_rows(path)
    first = next(rows, None)
    if first is None:
        raise DataFormatError(path, 1, "empty file (expected a header line such as '\\tid\\tsentence\\t...')")
    header_line, header = first
    names = [name.strip() for name in header]
    missing = [name for name in required if name not in names]
    if missing:
        raise DataFormatError(path, header_line, f"missing column(s) {', '.join(map(repr, missing))} "
                                                 f"(header found: {names})")
    wanted = {name: names.index(name) for name in (*required, *optional) if name in names}

    report, examples, first_line_of_id = ReadReport(path), [], {}
    for line, fields in rows:
        report.rows += 1
        try:
            if len(fields) != len(names):
                raise _BadRow(f"expected {len(names)} tab-separated fields as in the header, found {len(fields)}")
            values = {name: _unquote(fields[index]).strip() for name, index in wanted.items()}
            example = make(values)
            if example.id in first_line_of_id:
                raise _BadRow(f"duplicate id {example.id!r} (first on line {first_line_of_id[example.id]})")
            first_line_of_id[example.id] = line
        except _BadRow as problem:
            if not skip_malformed:
                raise DataFormatError(path, line, str(problem)) from None
            report.skipped.append((line, str(problem)))
            continue
        examples.append(example)
    if report.rows == 0:
        raise DataFormatError(path, header_line + 1, "no data rows after the header")
    if report.skipped:
        _warn_skipped(report)
    return examples


def _warn_skipped(report: ReadReport) -> None:
    lines = ", ".join(str(line) for line, _ in report.skipped[:5])
    more = ", ..." if report.n_skipped > 5 else ""
    warnings.warn(
        f"{report.path}: skipped {report.n_skipped} malformed row(s) of {report.rows} (lines {lines}{more}); "
        f"first problem: {report.skipped[0][1]}",
        MalformedRowsWarning,
        stacklevel=4,
    )


def id_problem(text: str) -> Optional[str]:
    """Why `text` cannot be an example id, or None. A prediction file line is `<id>, <prediction>`, so an id
    must be non-empty and hold no comma; the readers refuse such ids (with the line) before any training."""
    if not text.strip():
        return "empty id"
    if "," in text:
        return f"id {text!r} contains a comma, which the prediction files (`<id>, <prediction>`) cannot hold"
    return None


def _id(values: dict[str, str]) -> str:
    problem = id_problem(values["id"])
    if problem:
        raise _BadRow(problem)
    return values["id"]


def _require(values: dict[str, str], name: str) -> str:
    if not values[name]:
        raise _BadRow(f"empty {name}")
    return values[name]


def _label(values: dict[str, str], column: str, allowed: Optional[Sequence[int]], required: bool) -> Optional[int]:
    """The integer label in `column`: "3" and "3.0" are 3; anything else, or a value outside `allowed`, is an
    unknown label. A missing column or empty value is None unless labels are required."""
    text = values.get(column, "")
    if not text:
        if required:
            raise _BadRow(f"missing label in column {column!r}")
        return None
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number.is_integer() or (allowed is not None and int(number) not in allowed):
        allowed_text = f" (allowed: {', '.join(map(str, allowed))})" if allowed is not None else ""
        raise _BadRow(f"unknown label {text!r} in column {column!r}{allowed_text}")
    return int(number)


def read_sentiment(
    path: PathLike,
    labels: Optional[Sequence[int]] = None,
    require_labels: bool = True,
    skip_malformed: bool = False,
) -> list[SentimentExample]:
    """Rows of an `ids-{sst,cfimdb}-*.csv` file. `labels`: the allowed label values (e.g. range(5) for SST);
    None accepts any integer. Test-student files have no `sentiment` column: read them with
    require_labels=False (labels are then None). With skip_malformed=True, bad rows are skipped and announced
    with one MalformedRowsWarning (the file, how many of how many rows, their lines, the first problem)."""
    allowed = tuple(labels) if labels is not None else None

    def make(values: dict[str, str]) -> SentimentExample:
        return SentimentExample(
            id=_id(values),
            text=_require(values, "sentence"),
            label=_label(values, "sentiment", allowed, require_labels),
        )

    required = ("id", "sentence", "sentiment") if require_labels else ("id", "sentence")
    return _read_table(path, required, ("sentiment",), make, skip_malformed)


def read_paraphrase(
    path: PathLike, require_labels: bool = True, skip_malformed: bool = False
) -> list[ParaphraseExample]:
    """Rows of a `quora-*.csv` file; is_duplicate 0.0 / 1.0 becomes label 0 / 1 (None where the file has no
    labels and require_labels=False). skip_malformed as in read_sentiment."""

    def make(values: dict[str, str]) -> ParaphraseExample:
        return ParaphraseExample(
            id=_id(values),
            sentence1=_require(values, "sentence1"),
            sentence2=_require(values, "sentence2"),
            label=_label(values, "is_duplicate", (0, 1), require_labels),
        )

    base = ("id", "sentence1", "sentence2")
    required = (*base, "is_duplicate") if require_labels else base
    return _read_table(path, required, ("is_duplicate",), make, skip_malformed)


_NUMBER_LINE = re.compile(r"\s*(\d+)\s*")


def _text_lines(path: Path) -> list[str]:
    text = _decoded(path)
    if not text.strip():
        raise DataFormatError(path, 1, "empty file")
    return re.split(r"\r\n?|\n", text)  # not str.splitlines, which also breaks at form feeds and the like


def _sonnet_text(lines: list[str]) -> str:
    while lines and not lines[-1]:
        lines.pop()
    while lines and not lines[0]:
        lines.pop(0)
    return "\n".join(lines)


def read_sonnets(path: PathLike) -> list[Sonnet]:
    """The sonnets in `sonnets.txt`, the held-out files, the TRUE file or a generated-sonnets file, in file
    order. Anything before the first line that holds only a number is header. A sonnet is the lines after
    its number line up to the next one: each line right-stripped, blank lines at either end dropped, the
    rest kept as is, including the couplet's two-space indent (as the course's reader and the chrF
    references have it)."""
    path = Path(path)
    blocks: list[tuple[int, int, list[str]]] = []  # (number, line of the number, the lines after it)
    first_line_of: dict[int, int] = {}
    for line_no, line in enumerate(_text_lines(path), start=1):
        match = _NUMBER_LINE.fullmatch(line)
        if match is not None:
            number = int(match.group(1))
            if number in first_line_of:
                raise DataFormatError(path, line_no,
                                      f"sonnet {number} appears twice (first on line {first_line_of[number]})")
            first_line_of[number] = line_no
            blocks.append((number, line_no, []))
        elif blocks:
            blocks[-1][2].append(line.rstrip())
    if not blocks:
        raise DataFormatError(path, 1, "no sonnets found (a sonnet starts after a line holding only its number)")
    sonnets = []
    for number, line_no, lines in blocks:
        text = _sonnet_text(lines)
        if not text:
            raise DataFormatError(path, line_no, f"sonnet {number} has no text")
        sonnets.append(Sonnet(number, text))
    return sonnets


# ---------------------------------------------------------------------------------------------- writing


def _plain(value, what: str) -> str:
    """str(value) for a one-line field; numpy / torch scalars become Python numbers first."""
    if callable(getattr(value, "item", None)):
        value = value.item()
    text = str(value)
    if any(char in text for char in "\t\r\n"):
        raise ValueError(f"{what} {text!r} contains a tab or line break, which the file format cannot hold")
    return text


def _table_writer(handle):
    # QUOTE_MINIMAL: a field containing a quote is written CSV-quoted, which the readers undo exactly.
    return csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_MINIMAL, lineterminator="\n")


def write_sentiment(path: PathLike, examples: Iterable[SentimentExample]) -> None:
    """Writes examples in the `ids-sst-*.csv` layout; without labels (all None) the sentiment column is left
    out, as in the test-student files."""
    examples = list(examples)
    labelled = {example.label is not None for example in examples}
    if len(labelled) > 1:
        raise ValueError("either every example has a label or none has")
    with_labels = labelled != {False}
    with atomic_write(path) as handle:
        writer = _table_writer(handle)
        writer.writerow(["", "id", "sentence", "sentiment"] if with_labels else ["", "id", "sentence"])
        for index, example in enumerate(examples):
            row = [index, _plain(example.id, "id"), _plain(example.text, "text")]
            writer.writerow(row + [example.label] if with_labels else row)


def write_paraphrase(path: PathLike, examples: Iterable[ParaphraseExample]) -> None:
    """Writes examples in the `quora-*.csv` layout (is_duplicate as 0.0 / 1.0, like the course's files)."""
    with atomic_write(path) as handle:
        writer = _table_writer(handle)
        writer.writerow(["", "id", "sentence1", "sentence2", "is_duplicate"])
        for index, example in enumerate(examples):
            if example.label not in (0, 1):
                raise ValueError(f"paraphrase label must be 0 or 1, not {example.label!r} (id {example.id})")
            writer.writerow([index, _plain(example.id, "id"), _plain(example.sentence1, "sentence1"),
                             _plain(example.sentence2, "sentence2"), f"{float(example.label):.1f}"])


def write_predictions(path: PathLike, column_name: str, ids: Iterable[str], predictions: Iterable) -> None:
    """A prediction file in the course's exact format (graders parse it), as its classifier.py and
    paraphrase_detection.py write it: `id \\t <column_name> ` then one `<id>, <prediction> ` line per example.
    Use SENTIMENT_COLUMN or PARAPHRASE_COLUMN."""
    if hasattr(ids, "__len__") and hasattr(predictions, "__len__") and len(ids) != len(predictions):
        raise ValueError(f"{len(ids)} ids but {len(predictions)} predictions for {path}")
    with atomic_write(path) as handle:
        handle.write(f"id \t {column_name} \n")
        for sent_id, prediction in zip(ids, predictions, strict=True):
            sent_id = _plain(sent_id, "id")
            if id_problem(sent_id):
                raise ValueError(f"{path}: cannot write id {sent_id!r}: ids must be non-empty and free of commas")
            handle.write(f"{sent_id}, {_plain(prediction, 'prediction')} \n")


def read_predictions(path: PathLike, column_name: Optional[str] = None) -> dict[str, Union[int, str]]:
    """{id: prediction} from a file written by write_predictions (or the course's code). Integer
    predictions come back as int, anything else as the stripped string. `column_name`, when given, must
    match the header."""
    path = Path(path)
    lines = _text_lines(path)
    header = [part.strip() for part in lines[0].split("\t")]
    if len(header) != 2 or header[0] != "id" or (column_name is not None and header[1] != column_name):
        expected = f"'id \\t {column_name or '<column>'}'"
        raise DataFormatError(path, 1, f"expected the header {expected}, found {lines[0]!r}")
    predictions: dict[str, Union[int, str]] = {}
    first_line_of: dict[str, int] = {}
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        sent_id, comma, value = (part.strip() for part in line.partition(","))
        if not comma or not sent_id or not value:
            raise DataFormatError(path, line_no, f"expected '<id>, <prediction>', found {line!r}")
        if sent_id in first_line_of:
            raise DataFormatError(path, line_no, f"duplicate id {sent_id!r} (first on line {first_line_of[sent_id]})")
        first_line_of[sent_id] = line_no
        predictions[sent_id] = int(value) if re.fullmatch(r"[+-]?\d+", value) else value
    return predictions


def write_sonnets(path: PathLike, sonnets: Iterable[Union[Sonnet, tuple[int, str]]]) -> None:
    """Generated sonnets in the course's format: `--Generated Sonnets-- ` and a blank line, then for each
    sonnet a line with its number followed by its text. read_sonnets reads the file back."""
    with atomic_write(path) as handle:
        handle.write(SONNETS_HEADER)
        for sonnet in sonnets:
            number, text = (sonnet.number, sonnet.text) if isinstance(sonnet, Sonnet) else sonnet
            if any(_NUMBER_LINE.fullmatch(line) for line in text.split("\n")):
                # The course's format cannot tell such a line from the next sonnet's number.
                warnings.warn(f"{path}: sonnet {number} has a line holding only a number; it will read back "
                              f"as the start of another sonnet", stacklevel=2)
            handle.write(f"\n{int(number)}\n")
            handle.write(text)
