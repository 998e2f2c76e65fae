"""What a comparison runs: named variants (a method with its own flags) and seeds.

    lora                               a bare method name: the variant is named after it
    lora-r8=lora --rank 8              NAME=METHOD FLAGS: the variant's own training flags
    loreft-r1=loreft --rank 1 --positions l1

A long list can live in a JSON or TOML file (--variants-file), as a table of NAME = "METHOD FLAGS" or a list
of the strings above:

    # variants.toml                    // variants.json
    [variants]                         {"variants": {"lora-r8": "lora --rank 8",
    lora-r8 = "lora --rank 8"                        "loreft": "loreft"}}
    loreft = "loreft"
"""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path

from models.methods import method_names, method_parts, parse_methods
from models.peft import check_combination
from models.registry import path_label

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")  # a variant's name is also its run directory's


@dataclass(frozen=True)
class Variant:
    name: str
    method: str
    flags: tuple = ()  # training flags for this variant only

    @property
    def directory(self) -> str:
        """Its run directory's name under the comparison's (a bare 'loreft:late' is 'loreft-late')."""
        return path_label(self.name)

    def describe(self) -> str:
        """How it runs: 'lora --rank 8'."""
        return shlex.join([self.method, *self.flags])

    def to_dict(self) -> dict:
        return {"name": self.name, "method": self.method, "flags": list(self.flags)}


def method_name(text: str) -> str:
    """The one place a comparison reads a method's name (--methods, --variants, variant files): a method, or a
    combination of methods (lora+loreft) that may share a model."""
    name = text.strip()
    if name not in method_names():
        check_combination(method_parts(parse_methods(name)))  # ValueError naming the unknown or refused part
    return name


def parse_variant(text: str) -> Variant:
    """'NAME=METHOD FLAGS' or a bare 'METHOD'; ValueError naming the problem."""
    head, equals, rest = text.partition("=")
    name, spec = (head.strip(), rest) if equals and NAME.fullmatch(head.strip()) else (None, text)
    try:
        tokens = shlex.split(spec)
    except ValueError as error:
        raise ValueError(f"variant {text!r}: {error}") from None
    if not tokens:
        raise ValueError(f"variant {text!r}: give NAME=METHOD FLAGS or a method name")
    try:
        method = method_name(tokens[0])
    except ValueError as error:
        raise ValueError(f"variant {text!r}: {error}") from None
    if name is None:
        if len(tokens) > 1:
            raise ValueError(f"variant {text!r}: a variant with its own flags needs a name, as in "
                             f"\"{method}-custom={text.strip()}\"")
        name = method
    return Variant(name, method, tuple(tokens[1:]))


def read_variant_file(path: Path) -> list[Variant]:
    """Variants from a .json or .toml file; ValueError naming the file (and the entry)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ValueError(f"{path}: cannot read the variants file ({error.strerror or error})") from None
    try:
        if path.suffix == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix == ".json":
            raw = json.loads(text)
        else:
            raise ValueError("must end in .json or .toml")
    except (ValueError, tomllib.TOMLDecodeError) as error:
        raise ValueError(f"{path}: {error}") from None
    entries = raw.get("variants") if isinstance(raw, dict) else raw
    if isinstance(entries, dict):
        texts = []
        for name, spec in entries.items():
            if not isinstance(spec, str):
                raise ValueError(f"{path}: variant {name!r} must be a string \"METHOD FLAGS\", got {spec!r}")
            texts.append(f"{name}={spec}")
    elif isinstance(entries, list) and all(isinstance(item, str) for item in entries):
        texts = entries
    else:
        raise ValueError(f"{path}: expected a 'variants' table of NAME = \"METHOD FLAGS\" or a list of such strings")
    variants = []
    for text in texts:
        try:
            variants.append(parse_variant(text))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    if not variants:
        raise ValueError(f"{path}: lists no variants")
    return variants


def check_unique(variants: list[Variant]) -> None:
    names = [v.name for v in variants]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"each variant needs its own name: {', '.join(twice)} given more than once")
    directories = {}
    for v in variants:
        directories.setdefault(v.directory, []).append(v.name)
    shared = {directory: names for directory, names in directories.items() if len(names) > 1}
    if shared:
        raise ValueError("each variant needs its own run directory: " + "; ".join(
            f"{' and '.join(names)} would both write {directory}/" for directory, names in shared.items()))


def seed_list(text: str, first_seed: int) -> list[int]:
    """--seeds: a count N (the seeds first_seed, first_seed + 1, ...) or a comma-separated list of seeds."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise ValueError(f"must be a count such as 3 or a list of seeds such as 1,2,3; got {text!r}") from None
    if "," not in text:
        if len(values) != 1 or values[0] < 1:
            raise ValueError(f"must be a count >= 1 or a list of seeds such as 1,2,3; got {text!r}")
        return [first_seed + i for i in range(values[0])]
    if not values or len(set(values)) < len(values):
        raise ValueError(f"list each seed once; got {text!r}")
    return values
