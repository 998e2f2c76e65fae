"""A tiny but valid GPT-2 tokenizer (vocab.json + merges.txt) for tests that run without ../shared.

Ids 0-255 are the byte tokens in GPT-2's order, so single bytes get the same ids as in the real vocabulary
(" " = 220 `Ġ`, "\\n" = 198 `Ċ`, "t" = 83). Then one id per merge, in merge order, from 256:

    256 Ġt   257 he   258 Ġthe   259 no   260 Ġno   261 ye   262 yes   263 Ġyes
    264 Ġa   265 is   266 Ġis    267 ĊĊ
    268 <|endoftext|>   (the last id; vocab size 269)

so " the", "no", " no", "yes", " yes", " a", "is", " is", "\\n" and "\\n\\n" are single tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from models.tokenizer import EOS_TOKEN, bytes_to_unicode

TINY_MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"),  # " the"
    ("n", "o"), ("Ġ", "no"),  # "no", " no"
    ("y", "e"), ("ye", "s"), ("Ġ", "yes"),  # "yes", " yes"
    ("Ġ", "a"),  # " a"
    ("i", "s"), ("Ġ", "is"),  # "is", " is"
    ("Ċ", "Ċ"),  # a blank line
]


def tiny_vocab() -> dict[str, int]:
    tokens = list(bytes_to_unicode().values()) + [first + second for first, second in TINY_MERGES] + [EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}


def write_tiny_tokenizer(directory: Union[str, Path]) -> Path:
    """Writes vocab.json and merges.txt into `directory` (created if needed) and returns it as a Path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(tiny_vocab(), ensure_ascii=False), encoding="utf-8")
    merges = "".join(f"{first} {second}\n" for first, second in TINY_MERGES)
    (directory / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    return directory
