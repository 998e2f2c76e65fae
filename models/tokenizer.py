"""GPT-2's byte-level BPE tokenizer, from `vocab.json` + `merges.txt`.

Encoding a text: split it on the special token `<|endoftext|>`; cut each remaining part into words with
GPT-2's regular expression; map each word's UTF-8 bytes to printable characters (GPT-2's byte alphabet,
so every string is representable and no token is unknown); then repeatedly merge the adjacent pair that
comes first in merges.txt. Words repeat a lot in natural text, so each word's ids are cached.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import regex
import torch

from data.atomic import atomic_write
from models import hub

EOS_TOKEN = "<|endoftext|>"

# GPT-2's pre-tokenisation: English contractions, letters, digits and other symbols (each optionally
# led by one space), and whitespace, where a run of spaces leaves its last space to the next word.
_WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

# The per-word cache is cleared when it reaches this many entries, bounding memory on huge corpora;
# SST's whole training set has about 18k distinct words.
_CACHE_LIMIT = 1 << 18


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: every byte 0-255 as one printable character.

    Bytes that are already printable and not whitespace (`!`..`~`, `¡`..`¬`, `®`..`ÿ`) stand for
    themselves; the other 68 take the characters from U+0100 upwards, in byte order (so a space is `Ġ`,
    a newline `Ċ`). The order of the result is GPT-2's: ids 0-255 of its vocabulary follow it.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in kept}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


_BYTE_TO_CHAR = bytes_to_unicode()
# str.translate tables: a word's UTF-8 bytes read as latin-1 (one character per byte) -> byte alphabet, and back.
_ENCODE_BYTES = {byte: char for byte, char in _BYTE_TO_CHAR.items()}
_DECODE_BYTES = {ord(char): byte for byte, char in _BYTE_TO_CHAR.items()}


class GPT2Tokenizer:
    def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]], *,
                 vocab_source: str = "vocab", merges_source: str = "merges"):
        """`vocab` maps token -> id; `merges` are the BPE merges, highest priority first.

        The sources only name where the data came from in error messages; `from_files` is the usual way in.
        """
        if EOS_TOKEN not in vocab:
            raise ValueError(f"{vocab_source} has no {EOS_TOKEN} token, which GPT-2 needs as end of text")
        missing_bytes = [char for char in _BYTE_TO_CHAR.values() if char not in vocab]
        if missing_bytes:
            raise ValueError(f"{vocab_source} lacks {len(missing_bytes)} of the 256 byte tokens, e.g. {missing_bytes[0]!r}; "
                             "it is not a GPT-2 byte-level vocabulary")
        alphabet = set(_BYTE_TO_CHAR.values())
        for token in vocab:
            # Decoding maps every character back to a byte, so a token outside the alphabet could not be decoded.
            if token != EOS_TOKEN and not set(token) <= alphabet:
                raise ValueError(f"{vocab_source}: token {token!r} has characters outside GPT-2's byte alphabet")
        self._encoder = dict(vocab)
        self._decoder = {index: token for token, index in vocab.items()}
        if len(self._decoder) != len(self._encoder):
            raise ValueError(f"{vocab_source} gives the same id to more than one token")
        self._ranks = {pair: rank for rank, pair in enumerate(merges)}
        self._cache: dict[str, tuple[int, ...]] = {}

    @classmethod
    def from_files(cls, vocab_path: Union[str, Path], merges_path: Union[str, Path]) -> "GPT2Tokenizer":
        vocab_path, merges_path = Path(vocab_path), Path(merges_path)
        vocab = _read_vocab(vocab_path)
        merges = _read_merges(merges_path, vocab, vocab_path)
        return cls(vocab, merges, vocab_source=str(vocab_path), merges_source=str(merges_path))

    @classmethod
    def from_pretrained(cls, name_or_path: Union[str, Path]) -> "GPT2Tokenizer":
        """A directory holding vocab.json + merges.txt, or a hub name (gpt2, gpt2-medium, gpt2-large, gpt2-xl).

        Hub files come through the Hugging Face cache; offline and uncached this raises OSError quickly
        (see models/hub.py) with a message on passing a local directory instead.
        """
        path = Path(name_or_path)
        if path.is_dir():
            files = [path / "vocab.json", path / "merges.txt"]
            for file in files:
                if not file.is_file():
                    raise FileNotFoundError(f"{file} not found: a GPT-2 tokenizer directory holds vocab.json and merges.txt")
            return cls.from_files(*files)
        if str(name_or_path) in hub.HUB_REPOS:
            name = str(name_or_path)
            return cls.from_files(hub.hub_download(name, "vocab.json"), hub.hub_download(name, "merges.txt"))
        raise FileNotFoundError(
            f"tokenizer {str(name_or_path)!r}: no such directory, and not a hub name ({', '.join(hub.HUB_REPOS)}). "
            "Pass a directory containing vocab.json and merges.txt, such as ../shared/gpt2-tokenizer."
        )

    # ---- properties -------------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int:
        return self._encoder[EOS_TOKEN]

    @property
    def pad_token_id(self) -> int:
        # GPT-2 has no padding token; padded positions are masked out, so any id does, and eos is customary.
        return self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self._encoder)

    def __len__(self) -> int:
        return len(self._encoder)

    def fingerprint(self) -> str:
        """A sha256 of the vocabulary and the merges in rank order: tokenizers with the same fingerprint encode
        every text alike, wherever their files came from (a resume checks that the tokenizer did not change)."""
        merges = sorted(self._ranks, key=self._ranks.get)
        content = json.dumps([sorted(self._encoder.items()), merges], ensure_ascii=False)
        return hashlib.sha256(content.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"GPT2Tokenizer(vocab_size={self.vocab_size}, merges={len(self._ranks)})"

    def save_pretrained(self, directory: Union[str, Path]) -> Path:
        """Writes vocab.json and merges.txt (atomically) into `directory`, so that a checkpoint saved beside them
        carries its tokenizer and `from_pretrained(directory)` reads the same tokenizer back."""
        directory = Path(directory)
        with atomic_write(directory / "vocab.json") as handle:
            json.dump(self._encoder, handle, ensure_ascii=False)
        with atomic_write(directory / "merges.txt") as handle:
            handle.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in sorted(self._ranks, key=self._ranks.get)))
        return directory

    # ---- single texts -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a literal `<|endoftext|>` in it becomes the end-of-text token."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        if EOS_TOKEN not in text:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for i, part in enumerate(text.split(EOS_TOKEN)):
            if i:
                ids.append(self.eos_token_id)
            ids.extend(self._encode_ordinary(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """The text of `ids`. Byte sequences that are not valid UTF-8 (e.g. half a character) become U+FFFD."""
        if hasattr(ids, "tolist"):  # a tensor or numpy array
            ids = ids.tolist()
        try:
            chars = "".join(self._decoder[int(i)] for i in ids)
        except KeyError as error:
            raise ValueError(f"token id {error.args[0]} is not in the vocabulary (size {self.vocab_size})") from None
        return chars.translate(_DECODE_BYTES).encode("latin-1").decode("utf-8", errors="replace")

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for word in _WORD_PATTERN.findall(text):
            word_ids = cache.get(word)
            if word_ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                word_ids = cache[word] = self._bpe(word.encode("utf-8").decode("latin-1").translate(_ENCODE_BYTES))
            ids.extend(word_ids)
        return ids

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one word (already in the byte alphabet): merge the best-ranked adjacent pair until none applies."""
        parts = list(word)
        ranks = self._ranks
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged, i = [], 0
            while i < len(parts):  # every non-overlapping occurrence, left to right
                if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self._encoder[part] for part in parts)


def pad_sequences(sequences: Sequence[Sequence[int]], pad_id: int = 0, side: str = "right",
                  device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads token lists into (input_ids, attention_mask), both (B, T) long, the padding on the right (training,
    classification) or the left (generation prompts). The id under the padding does not matter: the mask
    keeps it out of attention, the last-token read-out and the loss."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, sequence in enumerate(sequences):
        span = slice(0, len(sequence)) if side == "right" else slice(width - len(sequence), width)
        ids[row, span] = torch.as_tensor(list(sequence), dtype=torch.long)
        mask[row, span] = 1
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def tokenizer_source(model: str, tokenizer: Optional[str] = None) -> str:
    """Where a model's tokenizer comes from: `tokenizer` when given, else the model directory when it holds
    vocab.json (checkpoints usually carry their tokenizer), else the hub's gpt2 (random and hub models)."""
    if tokenizer is not None:
        return tokenizer
    return model if (Path(model) / "vocab.json").is_file() else "gpt2"


def _read_vocab(path: Path) -> dict[str, int]:
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 vocabulary file not found: {path}")
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(vocab, dict) or not all(
            isinstance(index, int) and not isinstance(index, bool) and index >= 0 for index in vocab.values()):
        raise ValueError(f"{path} must be a JSON object mapping each token to a non-negative integer id")
    return vocab


def _read_merges(path: Path, vocab: dict[str, int], vocab_path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"GPT-2 merges file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {error}") from None
    merges = []
    for number, line in enumerate(lines, start=1):
        if (number == 1 and line.startswith("#version")) or not line.strip():
            continue
        pair = line.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"{path}, line {number}: expected two symbols separated by one space, got {line!r}")
        for symbol in (*pair, pair[0] + pair[1]):
            # Checked here so that a bad file fails on loading, not with a KeyError on some later text.
            if symbol not in vocab:
                raise ValueError(f"{path}, line {number}: {symbol!r} is not a token of {vocab_path}")
        merges.append((pair[0], pair[1]))
    return merges
