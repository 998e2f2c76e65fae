"""Fetches the public sources of the project's data sets and writes them as the CS224n files.

    python -m data.download                      # every task into data/
    python -m data.download --tasks sst,sonnet --data-dir ../shared/data --force

Raw downloads are cached under <data-dir>/raw/; files already in <data-dir> are left alone unless --force
(which also refetches). Row counts are checked against the published ones. Standard library only.
The files are close to, not identical with, the course's: see data/README.md for the differences.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import http.client
import io
import json
import re
import sys
import textwrap
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from data.atomic import atomic_write
from data.readers import (
    SENTIMENT_LABELS,
    TASK_FILES,
    DataFormatError,
    ParaphraseExample,
    PathLike,
    SentimentExample,
    read_paraphrase,
    read_sentiment,
    read_sonnets,
    write_paraphrase,
    write_sentiment,
)

TASKS = ("sst", "cfimdb", "quora", "sonnet")

_SST = "https://huggingface.co/datasets/SetFit/sst5/resolve/main/"
_CFIMDB = "https://raw.githubusercontent.com/acmi-lab/counterfactually-augmented-data/master/sentiment/orig/"
SOURCES: dict[str, str] = {
    "sst_train": _SST + "train.jsonl",
    "sst_dev": _SST + "dev.jsonl",  # SetFit names the validation split "dev"
    "sst_test": _SST + "test.jsonl",
    "cfimdb_train": _CFIMDB + "train.tsv",
    "cfimdb_dev": _CFIMDB + "dev.tsv",
    "cfimdb_test": _CFIMDB + "test.tsv",
    "quora": "https://dl.fbaipublicfiles.com/glue/data/QQP-clean.zip",
    "sonnet": "https://www.gutenberg.org/cache/epub/1041/pg1041.txt",
}

# Published row counts. SST-5 and CFIMDB match the course's files. GLUE's QQP split (363,846 / 40,430) is
# not the course's own (about 283k training pairs, with different dev/test), so Quora scores are not
# comparable with the course's.
EXPECTED_ROWS: dict[str, int] = {
    "sst_train": 8544, "sst_dev": 1101, "sst_test": 2210,
    "cfimdb_train": 1707, "cfimdb_dev": 245, "cfimdb_test": 488,
    "quora_train": 363846, "quora_dev": 40430,
}
SONNET_COUNT = 154
TRAIN_SONNETS = range(1, 132)
DEV_SONNETS = range(132, 144)
# The course's held-out test file is numbered 145-156: sonnets 145-154, then (as 155 and 156) its edition's
# Passionate Pilgrim versions of sonnets 138 and 144. Gutenberg has no such versions; 138 and 144 stand in.
TEST_SONNETS = {**{n: n for n in range(145, 155)}, 155: 138, 156: 144}
PROMPT_LINES = 3

TIMEOUT_S = 60
USER_AGENT = "cs224n-gpt2-peft-data-download/1.0 (Python urllib)"
_ID_LENGTH = 25


class DownloadError(RuntimeError):
    """A source that could not be fetched or converted; the message says which and what to do."""


@dataclass(frozen=True)
class Output:
    key: str  # names the --expect count for tables, and the output in messages
    task: str
    split: str  # key into TASK_FILES[task]
    source: str  # key into SOURCES

    def path(self, data_dir: Path) -> Path:
        return data_dir / TASK_FILES[self.task][self.split]


OUTPUTS: tuple[Output, ...] = (
    *(Output(f"{t}_{s}", t, s, f"{t}_{s}") for t in ("sst", "cfimdb") for s in ("train", "dev", "test")),
    Output("quora_train", "quora", "train", "quora"),
    Output("quora_dev", "quora", "dev", "quora"),
    *(Output(f"sonnet_{s}", "sonnet", s, "sonnet") for s in ("train", "dev", "dev_true", "test")),
)


# ---------------------------------------------------------------------------------------------- fetching


def _cache_path(raw_dir: Path, key: str, url: str) -> Path:
    # The URL's hash in the name: a different --url never reuses another source's cached bytes.
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    return raw_dir / f"{key}-{hashlib.sha256(url.encode()).hexdigest()[:10]}-{name}"


def _unreachable(url: str, reason: object) -> DownloadError:
    return DownloadError(
        f"could not reach {url} ({reason}). Without internet access, copy the CS224n data files into the data "
        f"directory by hand instead (see data/README.md), or point --url KEY=URL at a reachable copy."
    )


def fetch(url: str, cache: Path, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """`cache`, downloading `url` into it first (atomically) unless it is already there and not `force`."""
    if cache.is_file() and not force:
        log(f"using cached {cache}")
        return cache
    log(f"fetching {url}")
    try:
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response, atomic_write(cache, "wb") as out:
            announced = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                received += len(chunk)
            if announced is not None and received != int(announced):
                raise DownloadError(f"{url}: download truncated ({received} of {announced} bytes); try again")
    except urllib.error.HTTPError as error:
        raise DownloadError(f"{url}: HTTP error {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        raise _unreachable(url, error.reason) from None
    except http.client.IncompleteRead as error:
        raise DownloadError(f"{url}: download truncated ({len(error.partial)} bytes then the connection "
                            f"closed); try again") from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as error:
        raise DownloadError(f"{url}: the connection failed during the download ({error!r}); try again") from None
    except ValueError as error:  # urllib's answer to a malformed URL
        raise DownloadError(f"{url!r} is not a URL that can be fetched ({error})") from None
    return cache


# ---------------------------------------------------------------------------------------------- converting


class _Garbled(Exception):
    """Source content that is not in the expected format; turned into a DownloadError naming the source."""


def _one_line(text: str) -> str:
    """The text with tabs and line breaks as spaces (the target format is one row per line), stripped."""
    return re.sub(r"[\t\r\n]+", " ", text).strip()


def stable_ids(texts: Sequence[str]) -> list[str]:
    """A 25-hex-character id per text: a hash of its content, so ids survive re-downloads. A repeated text
    gets its occurrence number mixed in, keeping ids unique within a file."""
    seen: dict[str, int] = {}
    ids = []
    for text in texts:
        occurrence = seen.get(text, 0)
        seen[text] = occurrence + 1
        salt = f"\0{occurrence}" if occurrence else ""
        ids.append(hashlib.sha256((text + salt).encode("utf-8")).hexdigest()[:_ID_LENGTH])
    return ids


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise _Garbled(f"line {line}: not UTF-8 text") from None


def parse_sst_jsonl(raw: bytes) -> list[tuple[str, int]]:
    """(text, label) per line of SetFit/sst5's jsonl: {"text": ..., "label": 0-4, "label_text": ...}."""
    rows = []
    for line_no, line in enumerate(_decode(raw).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise _Garbled(f"line {line_no}: not JSON ({error.msg}): {line[:80]!r}") from None
        label = record.get("label") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str) \
                or type(label) is not int or label not in SENTIMENT_LABELS["sst"]:
            raise _Garbled(f"line {line_no}: expected an object with a text and a label 0-4: {line[:80]!r}")
        rows.append((record["text"], label))
    return rows


def parse_cfimdb_tsv(raw: bytes) -> list[tuple[str, int]]:
    """(text, label) per row of the counterfactually-augmented IMDb tsv (CSV-quoted columns Sentiment and
    Text; Negative = 0, Positive = 1)."""
    rows = []
    for line, record in _tsv_records(_decode(raw), ("Sentiment", "Text")):
        label = {"Negative": 0, "Positive": 1}.get(record["Sentiment"])
        if label is None:
            raise _Garbled(f"line {line}: unknown sentiment {record['Sentiment']!r}")
        rows.append((record["Text"], label))
    return rows


def _tsv_records(text: str, needed: tuple[str, ...], where: str = "", quoting: int = csv.QUOTE_MINIMAL):
    """(line number, {column: value}) per non-empty row of a tab-separated text whose header names `needed`;
    `where` prefixes the error messages."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=quoting)
    header = next(reader, None) or []
    if any(name not in header for name in needed):
        columns = ", ".join(needed[:-1]) + " and " + needed[-1]
        raise _Garbled(f"{where}line 1: expected the columns {columns}, found {header[:8]}")
    for fields in reader:
        if not fields:
            continue
        if len(fields) != len(header):
            raise _Garbled(f"{where}line {reader.line_num}: expected {len(header)} fields, found {len(fields)}")
        yield reader.line_num, dict(zip(header, fields))


def parse_qqp_zip(raw: bytes, split: str) -> list[tuple[str, str, str, int]]:
    """(id, question1, question2, is_duplicate) per row of QQP/<split>.tsv in GLUE's QQP-clean.zip."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(raw))
        names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == f"{split}.tsv"]
        if not names:
            raise _Garbled(f"no {split}.tsv in the archive (it holds {archive.namelist()[:8]})")
        content = archive.read(min(names, key=len))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as error:
        raise _Garbled(f"not a readable zip archive ({error})") from None
    # GLUE's tsvs are unquoted: a quote character is part of the question.
    rows = []
    records = _tsv_records(_decode(content), ("id", "question1", "question2", "is_duplicate"), f"{split}.tsv ",
                           quoting=csv.QUOTE_NONE)
    for line, record in records:
        label = record["is_duplicate"]
        if label.strip() not in ("0", "1"):
            raise _Garbled(f"{split}.tsv line {line}: is_duplicate {label!r} is not 0 or 1")
        rows.append((record["id"].strip(), record["question1"], record["question2"], int(label)))
    return rows


_ROMAN = {"I": 1, "V": 5, "X": 10, "L": 50, "C": 100}
_GUTENBERG_START = re.compile(r"\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.IGNORECASE)
_GUTENBERG_END = re.compile(r"\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG EBOOK", re.IGNORECASE)
_TYPOGRAPHIC = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})


def _sonnet_number(line: str) -> Optional[int]:
    """The number on a heading line ("XIV", "XIV.", "14"), or None for any other line."""
    token = line.strip().rstrip(".")
    if token.isdigit():
        return int(token)
    if not token or any(char not in _ROMAN for char in token):
        return None
    values = [_ROMAN[char] for char in token]
    # Subtractive notation: a symbol before a larger one counts negative (XIV = 10 - 1 + 5).
    return sum(-v if i + 1 < len(values) and v < values[i + 1] else v for i, v in enumerate(values))


def _course_line(line: str) -> str:
    """A dedented sonnet line as the course's files write it: ASCII quotes, an indented (couplet) line
    indented by exactly two spaces (Gutenberg's copies use two or four)."""
    line = line.translate(_TYPOGRAPHIC)
    return "  " + line.lstrip() if line[:1].isspace() else line


def parse_gutenberg_sonnets(raw: bytes) -> dict[int, list[str]]:
    """Sonnet number -> its lines, from Project Gutenberg's plain-text ebook 1041 (headings I ... CLIV; the
    licence around the '*** START/END OF ...' lines is ignored, and a copy without them also parses). A
    sonnet is the block of non-blank lines after its heading."""
    lines = _decode(raw).splitlines()
    start = next((i + 1 for i, line in enumerate(lines) if _GUTENBERG_START.match(line)), 0)
    end = next((i for i, line in enumerate(lines) if _GUTENBERG_END.match(line)), len(lines))
    body = lines[start:end]

    sonnets: dict[int, list[str]] = {}
    index = 0
    while index < len(body):
        number = _sonnet_number(body[index])
        index += 1
        if number is None or (not sonnets and number != 1):
            continue  # title page and front matter before sonnet 1
        if number != len(sonnets) + 1:
            raise _Garbled(f"expected the heading of sonnet {len(sonnets) + 1}, found {body[index - 1].strip()!r}")
        while index < len(body) and not body[index].strip():
            index += 1
        block = []
        while index < len(body) and body[index].strip() and _sonnet_number(body[index]) is None:
            block.append(body[index].rstrip())
            index += 1
        if not 12 <= len(block) <= 15:  # 126 has 12 lines, 99 has 15; the rest 14
            raise _Garbled(f"sonnet {number} has {len(block)} lines; expected 12 to 15")
        sonnets[number] = [_course_line(line) for line in textwrap.dedent("\n".join(block)).split("\n")]
    if not sonnets:
        raise _Garbled("no sonnet headings (I, II, ... or 1, 2, ...) found; is this Project Gutenberg's ebook 1041?")
    if len(sonnets) != SONNET_COUNT:
        raise _Garbled(f"found {len(sonnets)} sonnets, expected {SONNET_COUNT}")
    return sonnets


def sonnet_files(sonnets: dict[int, list[str]]) -> dict[str, str]:
    """The four sonnet files' contents, keyed like TASK_FILES["sonnet"], in the course files' layout."""
    header = ("Sonnets\nby William Shakespeare\n"
              "From Project Gutenberg eBook #1041, https://www.gutenberg.org/ebooks/1041\n\n\n\n\n")

    def layout(numbered: dict[int, int], keep: Optional[int]) -> str:
        parts = [header]
        for number, source in numbered.items():
            parts.append(f"{number}\n\n" + "\n".join(sonnets[source][:keep]) + "\n\n")
        return "".join(parts)

    return {
        "train": layout({n: n for n in TRAIN_SONNETS}, None),
        "dev": layout({n: n for n in DEV_SONNETS}, PROMPT_LINES),
        "dev_true": layout({n: n for n in DEV_SONNETS}, None),
        "test": layout(TEST_SONNETS, PROMPT_LINES),
    }


# ---------------------------------------------------------------------------------------------- the command


class Downloader:
    """Builds the missing output files of some tasks; one instance per run, so a source shared by several
    outputs (the QQP zip, the Gutenberg text) is fetched and parsed once."""

    def __init__(self, data_dir: PathLike, urls: Optional[dict[str, str]] = None,
                 expected: Optional[dict[str, int]] = None, force: bool = False,
                 log: Callable[[str], None] = print):
        unknown = sorted(set(urls or {}) - set(SOURCES)) + sorted(set(expected or {}) - set(EXPECTED_ROWS))
        if unknown:
            raise ValueError(f"unknown source or count key(s) {', '.join(unknown)}; "
                             f"URL keys: {', '.join(SOURCES)}; count keys: {', '.join(EXPECTED_ROWS)}")
        self.data_dir = Path(data_dir)
        self.urls = {**SOURCES, **(urls or {})}
        self.expected = {**EXPECTED_ROWS, **(expected or {})}
        self.force, self.log = force, log
        self._raw: dict[str, bytes] = {}

    def run(self, tasks: Iterable[str] = TASKS) -> list[Path]:
        """Writes every missing (or, with force, every) output of `tasks`; returns the files written."""
        tasks = list(tasks)
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        written = []
        for output in (o for o in OUTPUTS if o.task in tasks):
            target = output.path(self.data_dir)
            if target.exists() and not self.force:
                self.log(f"{target} exists; skipping it (--force fetches it again)")
                continue
            self._build(output, target)
            written.append(target)
        return written

    def _source(self, key: str) -> bytes:
        if key not in self._raw:
            url = self.urls[key]
            cache = _cache_path(self.data_dir / "raw", key, url)
            self._raw[key] = fetch(url, cache, force=self.force, log=self.log).read_bytes()
        return self._raw[key]

    def _parse(self, key: str, parse: Callable[[bytes], object]):
        try:
            return parse(self._source(key))
        except _Garbled as problem:
            cached = _cache_path(self.data_dir / "raw", key, self.urls[key])
            raise DownloadError(f"{self.urls[key]} (cached as {cached}) is not in the expected format: {problem}. "
                                f"Rerun with --force to fetch it again") from None

    def _check_count(self, output: Output, target: Path, found: int) -> None:
        expected = self.expected[output.key]
        if found != expected:
            raise DownloadError(f"{target.name}: expected {expected} rows, found {found} in "
                                f"{self.urls[output.source]} (pass --expect {output.key}={found} to accept it)")

    def _build(self, output: Output, target: Path) -> None:
        build = {"sonnet": self._build_sonnets, "quora": self._build_paraphrase}.get(output.task, self._build_sentiment)
        build(output, target)

    def _build_sentiment(self, output: Output, target: Path) -> None:
        rows = self._parse(output.source, parse_sst_jsonl if output.task == "sst" else parse_cfimdb_tsv)
        self._check_count(output, target, len(rows))
        texts = [_one_line(text) for text, _ in rows]
        with_labels = output.split != "test"  # test files are unlabelled, like the course's
        examples = [SentimentExample(sent_id, text, label if with_labels else None)
                    for sent_id, text, (_, label) in zip(stable_ids(texts), texts, rows)]
        write_sentiment(target, self._drop_empty(target, examples, lambda e: e.text))
        count = len(read_sentiment(target, SENTIMENT_LABELS[output.task], require_labels=with_labels))
        self.log(f"wrote {target} ({count} rows)")

    def _build_paraphrase(self, output: Output, target: Path) -> None:
        rows = self._parse(output.source, lambda raw: parse_qqp_zip(raw, output.split))
        self._check_count(output, target, len(rows))
        examples = [ParaphraseExample(pair_id, _one_line(q1), _one_line(q2), label)
                    for pair_id, q1, q2, label in rows]
        write_paraphrase(target, self._drop_empty(target, examples, lambda e: e.sentence1 and e.sentence2))
        self.log(f"wrote {target} ({len(read_paraphrase(target))} rows)")

    def _drop_empty(self, target: Path, examples: list, has_text: Callable) -> list:
        kept = [example for example in examples if has_text(example)]
        if len(kept) != len(examples):
            warnings.warn(f"{target}: left out {len(examples) - len(kept)} source row(s) with an empty text",
                          stacklevel=3)
        return kept

    def _build_sonnets(self, output: Output, target: Path) -> None:
        contents = sonnet_files(self._parse(output.source, parse_gutenberg_sonnets))
        with atomic_write(target) as handle:
            handle.write(contents[output.split])
        self.log(f"wrote {target} ({len(read_sonnets(target))} sonnets)")


def download(tasks: Iterable[str] = TASKS, data_dir: PathLike = "data", urls: Optional[dict[str, str]] = None,
             expected: Optional[dict[str, int]] = None, force: bool = False,
             log: Callable[[str], None] = print) -> list[Path]:
    """Fetches and converts the sources of `tasks` into `data_dir`; returns the files written. `urls` and
    `expected` override SOURCES and EXPECTED_ROWS entries. Raises DownloadError (ValueError for bad keys)."""
    return Downloader(data_dir, urls, expected, force, log).run(tasks)


def _key_values(pairs: Sequence[str], option: str, convert: Callable[[str], object]) -> dict:
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"{option} takes KEY=VALUE, not {pair!r}")
        try:
            result[key] = convert(value)
        except ValueError:
            raise ValueError(f"{option} {pair!r}: {value!r} is not valid here") from None
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.download",
        description="Download the public sources of the SST-5, CFIMDB, Quora and sonnet data and write them "
                    "as the CS224n project's files.",
    )
    parser.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    parser.add_argument("--data-dir", default="data", help="where the files go (default: data/)")
    parser.add_argument("--force", action="store_true", help="refetch and rewrite files that already exist")
    parser.add_argument("--url", action="append", default=[], metavar="KEY=URL",
                        help=f"use another URL for a source; keys: {', '.join(SOURCES)}")
    parser.add_argument("--expect", action="append", default=[], metavar="KEY=ROWS",
                        help=f"expect another row count; keys: {', '.join(EXPECTED_ROWS)}")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        urls = _key_values(args.url, "--url", str)
        expected = _key_values(args.expect, "--expect", int)
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        written = download(tasks, args.data_dir, urls, expected, args.force)
    except (DownloadError, DataFormatError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # bad --url / --expect / --tasks values
        parser.error(str(error))
    print(f"done: {len(written)} file(s) written to {args.data_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
