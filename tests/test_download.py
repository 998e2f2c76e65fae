"""data.download against a local HTTP server serving small files in each source's format: conversion into
files the readers accept, the count / HTTP / connection / format errors, skipping existing files, --force."""
from __future__ import annotations

import csv
import io
import json
import socket
import subprocess
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data import download as dl
from data.download import DownloadError, download
from data.readers import default_paths, read_paraphrase, read_sentiment, read_sonnets

REPO = Path(__file__).resolve().parents[1]

SST = {
    "train": [("a gripping , funny film", 4), ('he said " wow "', 3), ("a gripping , funny film", 2)],
    "dev": [("dull", 0), ("fine", 2)],
    "test": [("great", 4), ("bad", 1)],
}
CFIMDB = {
    "train": [("Positive", 'I loved "Jaws".<br /><br />Great.'), ("Negative", "Awful,\nawful\tfilm.")],
    "dev": [("Negative", "Meh.")],
    "test": [("Positive", "Wow."), ("Negative", "No.")],
}
QQP = {
    "train": [("7", "How do I cook rice?", 'What is "Me too"?', "0"), ("8", "Why?", "Why not?", "1"),
              ("9", "Is it?", "Is it really?", "1")],
    "dev": [("11", "A?", "B?", "0"), ("12", "C?", "D?", "1")],
}
SMALL_COUNTS = {f"sst_{s}": len(rows) for s, rows in SST.items()} | \
    {f"cfimdb_{s}": len(rows) for s, rows in CFIMDB.items()} | {f"quora_{s}": len(rows) for s, rows in QQP.items()}


def roman(number: int) -> str:
    digits = [(100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    result = ""
    for value, letters in digits:
        while number >= value:
            result, number = result + letters, number - value
    return result


def sonnet_lines(number: int) -> list[str]:
    # As in Gutenberg's older copies: every line indented by two, the couplet by four; typographic quotes.
    count = {99: 15, 126: 12}.get(number, 14)
    lines = [f"  Line {i} of sonnet {number}, thy beauty\u2019s use," for i in range(1, count - 1)]
    return lines + [f"    Couplet one of {number},", f"    Couplet two of {number}."]


def gutenberg_text() -> str:
    parts = ["The Project Gutenberg eBook of Shakespeare's Sonnets\n\nRelease date: ...\n\n",
             "*** START OF THE PROJECT GUTENBERG EBOOK SHAKESPEARE'S SONNETS ***\n\n\n\nTHE SONNETS\n\n"
             "by William Shakespeare\n\n"]
    for number in range(1, 155):
        parts.append(f"\n\n                    {roman(number)}\n\n" + "\n".join(sonnet_lines(number)) + "\n")
    parts.append("\n\n\n*** END OF THE PROJECT GUTENBERG EBOOK SHAKESPEARE'S SONNETS ***\n\nLicense text.\n")
    return "".join(parts)


def tsv(rows: list[tuple], header: tuple, quoting=csv.QUOTE_MINIMAL) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, delimiter="\t", quoting=quoting, lineterminator="\n", escapechar=None)
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue().encode()


def qqp_zip(qqp: dict) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for split, rows in qqp.items():
            lines = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
            lines += [f"{i}\t1\t2\t{q1}\t{q2}\t{label}" for i, q1, q2, label in rows]
            archive.writestr(f"QQP/{split}.tsv", "\n".join(lines) + "\n")
    return out.getvalue()


def jsonl(rows: list[tuple[str, int]]) -> bytes:
    return "".join(json.dumps({"text": t, "label": y, "label_text": "x"}) + "\n" for t, y in rows).encode()


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        if self.path == "/truncated":  # announces more bytes than it sends, then hangs up
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"text": "a", "label": 1}\n')
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    files = {f"sst_{s}.jsonl": jsonl(rows) for s, rows in SST.items()}
    files |= {f"cfimdb_{s}.tsv": tsv(rows, ("Sentiment", "Text")) for s, rows in CFIMDB.items()}
    files |= {"QQP-clean.zip": qqp_zip(QQP), "pg1041.txt": gutenberg_text().encode()}
    files |= {"garbled.jsonl": b'{"text": "ok", "label": 1}\n<html>Service unavailable</html>\n',
              "notzip.zip": b"<html>not a zip</html>",
              "nogutenberg.txt": b"<html><body>Service unavailable</body></html>\n",
              "shortsonnet.txt": b"THE SONNETS\n\n  I\n\n  A line\n  Another\n\n  II\n",
              "badheader.tsv": b"label\ttext\nPositive\tx\n"}
    for name, content in files.items():
        (root / name).write_bytes(content)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def source_urls(base: str) -> dict[str, str]:
    urls = {f"{task}_{s}": f"{base}/{task}_{s}.{ext}" for task, ext in (("sst", "jsonl"), ("cfimdb", "tsv"))
            for s in ("train", "dev", "test")}
    return urls | {"quora": f"{base}/QQP-clean.zip", "sonnet": f"{base}/pg1041.txt"}


def refused_url() -> str:
    # A port that was just free: nothing listens there, so the connection is refused.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/train.jsonl"


def run(data_dir: Path, base: str, tasks=dl.TASKS, **overrides) -> tuple[list[Path], list[str]]:
    log: list[str] = []
    urls = source_urls(base) | overrides.pop("urls", {})
    expected = SMALL_COUNTS | overrides.pop("expected", {})
    written = download(tasks, data_dir, urls=urls, expected=expected, log=log.append, **overrides)
    return written, log


# ---------------------------------------------------------------------------------------------- conversions


def test_every_task_converts_into_files_the_readers_accept(server, tmp_path):
    _, base = server
    written, _ = run(tmp_path, base)
    assert len(written) == 12 and all(path.parent == tmp_path for path in written)

    sst = default_paths("sst", tmp_path)
    train = read_sentiment(sst["train"], labels=range(5))
    assert [(e.text, e.label) for e in train] == SST["train"]
    assert all(len(e.id) == 25 and int(e.id, 16) >= 0 for e in train)
    assert len({e.id for e in train}) == 3  # a repeated text still gets its own id
    assert train[0].id == dl.stable_ids(["a gripping , funny film"])[0]  # ids are content hashes
    test = read_sentiment(sst["test"], require_labels=False)
    assert [(e.text, e.label) for e in test] == [("great", None), ("bad", None)]

    cfimdb = read_sentiment(default_paths("cfimdb", tmp_path)["train"], labels=(0, 1))
    assert [(e.text, e.label) for e in cfimdb] == [('I loved "Jaws".<br /><br />Great.', 1), ("Awful, awful film.", 0)]

    quora = default_paths("quora", tmp_path)
    pairs = read_paraphrase(quora["train"])
    assert [(p.id, p.sentence2, p.label) for p in pairs] == [("7", 'What is "Me too"?', 0), ("8", "Why not?", 1),
                                                            ("9", "Is it really?", 1)]
    assert len(read_paraphrase(quora["dev"])) == 2
    assert not quora["test"].exists()  # GLUE has no labelled test split to convert

    sonnets = default_paths("sonnet", tmp_path)
    train_sonnets = read_sonnets(sonnets["train"])
    assert [s.number for s in train_sonnets] == list(range(1, 132))
    first = train_sonnets[0].lines
    assert len(first) == 14 and first[0] == "Line 1 of sonnet 1, thy beauty's use,"  # ASCII apostrophe
    assert first[-1] == "  Couplet two of 1."  # the couplet indented by two, as in the course's files
    assert len(train_sonnets[98].lines) == 15 and len(train_sonnets[125].lines) == 12
    dev, true_dev = read_sonnets(sonnets["dev"]), read_sonnets(sonnets["dev_true"])
    assert [s.number for s in dev] == [s.number for s in true_dev] == list(range(132, 144))
    assert all(d.lines == t.lines[:3] and len(t.lines) == 14 for d, t in zip(dev, true_dev))
    held_out = read_sonnets(sonnets["test"])
    assert [s.number for s in held_out] == list(range(145, 157))
    assert held_out[0].lines[0] == "Line 1 of sonnet 145, thy beauty's use,"
    assert held_out[-2].lines[0].endswith("sonnet 138, thy beauty's use,") and len(held_out[-1].lines) == 3
    assert len(list((tmp_path / "raw").iterdir())) == 8  # every source cached once


def test_command_line_run(server, tmp_path):
    _, base = server
    urls = source_urls(base)
    command = [sys.executable, "-m", "data.download", "--tasks", "sst,quora", "--data-dir", str(tmp_path)]
    for key in ("sst_train", "sst_dev", "sst_test", "quora"):
        command += ["--url", f"{key}={urls[key]}"]
    for key in ("sst_train", "sst_dev", "sst_test", "quora_train", "quora_dev"):
        command += ["--expect", f"{key}={SMALL_COUNTS[key]}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "done: 5 file(s) written" in done.stdout
    assert len(read_sentiment(tmp_path / "ids-sst-dev.csv", labels=range(5))) == 2
    assert len(read_paraphrase(tmp_path / "quora-train.csv")) == 3

    # The first source fetched answers 404, so no other (default, real) URL is ever tried.
    failing = [sys.executable, "-m", "data.download", "--tasks", "sst", "--data-dir", str(tmp_path), "--force",
               "--url", f"sst_train={base}/missing.jsonl"]
    done = subprocess.run(failing, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "error:" in done.stderr and "HTTP error 404" in done.stderr
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------- errors


def test_row_count_mismatch_names_file_and_counts(server, tmp_path):
    _, base = server
    with pytest.raises(DownloadError) as error:
        run(tmp_path, base, tasks=["sst"], expected={"sst_train": 5})
    message = str(error.value)
    assert "ids-sst-train.csv" in message and "expected 5 rows, found 3" in message and "sst_train.jsonl" in message
    assert not (tmp_path / "ids-sst-train.csv").exists()
    with pytest.raises(DownloadError, match=r"quora-dev.csv: expected 40430 rows, found 2"):
        download(["quora"], tmp_path, urls={"quora": f"{base}/QQP-clean.zip"}, expected={"quora_train": 3},
                 log=lambda _: None)  # the published GLUE count applies unless overridden


def test_http_error(server, tmp_path):
    _, base = server
    with pytest.raises(DownloadError, match=r"/nothing-here.jsonl: HTTP error 404"):
        run(tmp_path, base, tasks=["sst"], urls={"sst_train": f"{base}/nothing-here.jsonl"})
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_unreachable_url_says_how_to_proceed(tmp_path):
    url = refused_url()
    with pytest.raises(DownloadError) as error:
        download(["sst"], tmp_path, urls={f"sst_{s}": url for s in ("train", "dev", "test")}, log=lambda _: None)
    message = str(error.value)
    assert f"could not reach {url}" in message and "copy the CS224n data files" in message and "by hand" in message


@pytest.mark.parametrize("key, name, problem", [
    ("sst_train", "garbled.jsonl", "line 2: not JSON"),
    ("quora", "notzip.zip", "not a readable zip archive"),
    ("sonnet", "nogutenberg.txt", "no sonnet headings"),
    ("sonnet", "shortsonnet.txt", "sonnet 1 has 2 lines; expected 12 to 15"),
    ("cfimdb_train", "badheader.tsv", "expected the columns Sentiment and Text"),
])
def test_garbled_sources(server, tmp_path, key, name, problem):
    _, base = server
    task = key.split("_")[0]
    with pytest.raises(DownloadError) as error:
        run(tmp_path, base, tasks=[task], urls={key: f"{base}/{name}"})
    message = str(error.value)
    assert f"{base}/{name}" in message and "not in the expected format" in message and problem in message
    assert "--force" in message


def test_truncated_download(server, tmp_path):
    _, base = server
    with pytest.raises(DownloadError, match="truncated"):
        run(tmp_path, base, tasks=["sst"], urls={"sst_train": f"{base}/truncated"})
    assert not any((tmp_path / "raw").iterdir())  # no partial file in the cache


def test_bad_keys_and_tasks(tmp_path):
    with pytest.raises(ValueError, match="unknown source or count key.*sst_validation"):
        download(["sst"], tmp_path, urls={"sst_validation": "http://x"})
    with pytest.raises(ValueError, match="unknown task.*imdb"):
        download(["imdb"], tmp_path)
    done = subprocess.run([sys.executable, "-m", "data.download", "--expect", "sst_train=many"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "sst_train=many" in done.stderr


# ---------------------------------------------------------------------------------------------- re-runs


def test_existing_files_are_skipped_and_force_refetches(server, tmp_path):
    root, base = server
    run(tmp_path, base, tasks=["sst"])
    train = tmp_path / "ids-sst-train.csv"
    before = train.read_bytes()

    # Nothing is fetched for files already there: even unreachable sources do not matter.
    dead = {key: refused_url() for key in ("sst_train", "sst_dev", "sst_test")}
    written, log = run(tmp_path, base, tasks=["sst"], urls=dead)
    assert written == [] and sum("exists; skipping" in line for line in log) == 3

    # A missing file is rebuilt from the cache, the others left alone.
    (tmp_path / "ids-sst-dev.csv").unlink()
    written, log = run(tmp_path, base, tasks=["sst"])
    assert written == [tmp_path / "ids-sst-dev.csv"] and any("using cached" in line for line in log)
    assert train.read_bytes() == before

    # --force fetches again (the source changed since) and rewrites.
    (root / "sst_train_v2.jsonl").write_bytes(jsonl(SST["train"] + [("one more", 1)]))
    urls = {"sst_train": f"{base}/sst_train_v2.jsonl"}
    written, log = run(tmp_path, base, tasks=["sst"], urls=urls, expected={"sst_train": 4}, force=True)
    assert len(written) == 3 and sum(line.startswith("fetching") for line in log) == 3
    assert [e.text for e in read_sentiment(train)][-1] == "one more"


# ---------------------------------------------------------------------------------------------- helpers


def test_roman_headings_and_stable_ids():
    assert [dl._sonnet_number(h) for h in ("I", " XIV. ", "XL", "CXLIX", "CLIV", "14", "THE", "")] == \
        [1, 14, 40, 149, 154, 14, None, None]
    first = dl.stable_ids(["x", "y", "x"])
    assert first == dl.stable_ids(["x", "y", "x"]) and len(set(first)) == 3
    assert all(len(i) == 25 and set(i) <= set("0123456789abcdef") for i in first)
