"""The machinery of the method registry: what an option and a method declare, and MethodConfig, a method with
its options. The built-in methods themselves are declared in models/methods.py, which is what callers import.

A method is one `Method` entry: its name, the options it takes with their defaults, its default learning rate,
how it is applied to a GPT2Model and whether several can share a model. An option is one `Option` entry: its
command-line flag, help, parser and check. Everything else derives from these two tables: MethodConfig's
validation, the command-line flags (tasks/cli.py), compare.py's flag routing, the adapter files
(models/peft.py) and the README's method table (`python -m models.method_table`).

A combination of methods in one model (`--method lora+loreft`) is a list of MethodConfigs, one per part; the
functions under "combinations" below read and write it, models/peft.py's check_combination says which
families may share a model.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


class OptionError(ValueError):
    """A bad value for one option: `option` is its name, `detail` the problem ('must be >= 1, got 0'); the
    message names the option in words, the command line names its flag instead."""

    def __init__(self, option: "Option", detail: str):
        super().__init__(f"{option.label} {detail}")
        self.option, self.detail = option, detail


@dataclass(frozen=True)
class Option:
    name: str  # the MethodConfig attribute and the key in adapter_config.json
    help: str
    flag: Optional[str] = None  # the command-line flag; None: set from Python only
    parse: Callable[[str], Any] = str  # the flag's text -> the value; ValueError('must be ...') when it cannot
    check: Optional[Callable[[Any], Any]] = None  # value -> normalised value; ValueError('must be ...') when bad
    switch: Any = None  # a flag that takes no value sets this (True; False for --untie-positions)
    choices: Optional[tuple] = None  # the values the flag accepts, for --help
    label: Optional[str] = None  # how messages name the option ('LoRA targets'); default: its name
    unset: str = "all"  # how help and the README show a default of None ('all' layers, 'off')
    tokenized_into: Optional[str] = None  # a text option: the option that holds its token ids under the run's
    #                                       tokenizer (filled in by tokenize_text_options)

    def __post_init__(self):
        if self.label is None:
            object.__setattr__(self, "label", self.name)

    def describe(self, default: Any) -> str:
        """A method's default for this option as help and the README show it; a switch flag is 'off' unless the
        default is what the flag sets."""
        if self.switch is not None:
            return "on" if default == self.switch else "off"
        return self.unset if default is None else describe_default(default)

    def normalise(self, value: Any) -> Any:
        if self.check is None:
            return value
        try:
            return self.check(value)
        except ValueError as error:
            raise OptionError(self, str(error)) from None


@dataclass(frozen=True)
class Method:
    name: str  # the --method value
    trains: str  # what trains, in a few words (the README's table)
    apply: Callable  # apply(gpt, config, layers): adds the method's trainable parts to gpt, in place
    options: dict = field(default_factory=dict)  # option name -> default; a callable default is computed from
    #                                              the other options (ReFT's alpha defaults to the rank)
    lr: float = 1e-3  # default peak learning rate
    freezes_base: bool = True  # False: GPT-2's own weights train too (full fine-tuning)
    adapts_gpt2: bool = True  # False: nothing inside GPT-2 trains, only a task's head
    stacks: bool = False  # several stacking methods can share one model, each under its own `name` option
    family: str = "weights"  # what it changes: "base" (all of GPT-2), "head" (nothing inside GPT-2), "weights"
    #                          (GPT-2's weights or their updates), "reft" (hidden states), "prompt" (virtual tokens)
    saved_as: Optional[Callable] = None  # config -> the config an adapter file records, for a method whose
    #                                      training-only reparametrisation folds away (its modules' `folded()`)


FAMILIES = ("base", "head", "weights", "reft", "prompt")
OPTIONS: dict[str, Option] = {}
METHODS: dict[str, Method] = {}


def define_option(option: Option) -> Option:
    """Adds an option that methods can then name; options are shared (one --rank for every method with a rank)."""
    if option.name in OPTIONS and OPTIONS[option.name] != option:
        raise ValueError(f"option {option.name!r} is already defined differently")
    if option.name in ("method", "options"):
        raise ValueError(f"{option.name!r} cannot be an option name")
    flags = {o.flag: o.name for o in OPTIONS.values() if o.flag}
    if option.flag and flags.get(option.flag, option.name) != option.name:
        raise ValueError(f"flag {option.flag} already belongs to option {flags[option.flag]!r}")
    OPTIONS[option.name] = option
    return option


def register_method(method: Method) -> Method:
    """Adds a method: from then on MethodConfig, apply_method, the command line, compare.py and the adapter files
    know it. Its options must be defined first (define_option)."""
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    unknown = [name for name in method.options if name not in OPTIONS]
    if unknown:
        raise ValueError(f"method {method.name!r} names options that are not defined: {', '.join(unknown)}")
    if method.family not in FAMILIES:
        raise ValueError(f"method {method.name!r}: family must be one of {', '.join(FAMILIES)}, got {method.family!r}")
    if method.stacks and "name" not in method.options:
        raise ValueError(f"method {method.name!r} stacks, so it needs the 'name' option")
    METHODS[method.name] = method
    return method


def saved_form(config: "MethodConfig") -> "MethodConfig":
    """The method as its adapter file records it: itself, or what its training form folds into."""
    saved_as = config.spec.saved_as
    return config if saved_as is None else saved_as(config)


def tokenize_text_options(config: "MethodConfig", tokenizer) -> "MethodConfig":
    """A copy of `config` whose text options (`Option.tokenized_into`) have their token ids under `tokenizer`."""
    options = dict(config.options)
    for name, text in config.options.items():
        target = OPTIONS[name].tokenized_into
        if target is not None and text is not None:
            ids = tokenizer.encode(text)
            if not ids:
                raise OptionError(OPTIONS[name], f"gives no tokens, got {text!r}")
            options[target] = ids
    return MethodConfig(config.method, **options)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_names() -> tuple[str, ...]:
    return tuple(METHODS)


def registered_methods() -> list[Method]:
    return list(METHODS.values())


def describe_default(value: Any) -> str:
    """An option's default as the help and the README show it: 'all' for every layer, '8', 'query,value', 'off'."""
    if value is None:
        return "all"
    if callable(value):
        return (value.__doc__ or "computed from the other options").strip()
    if isinstance(value, tuple):
        return ",".join(value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def flag_options() -> list[Option]:
    """The options that have a command-line flag, in definition order."""
    return [option for option in OPTIONS.values() if option.flag]


class MethodConfig:
    """A fine-tuning method and its options. Options left out (or None) take the method's defaults; an option
    of another method is an error. Options read and write as attributes (`config.rank`); an option that the
    method does not take reads as None.

        MethodConfig("loreft", rank=4, positions="l1")
    """

    def __init__(self, method: str = "full", **options: Any):
        spec = get_method(method)
        for name, value in options.items():
            if name not in OPTIONS:
                raise ValueError(f"unknown method option {name!r}")
            if name not in spec.options and value is not None:
                raise ValueError(f"option {name!r} does not apply to method {method!r}")
        values = {}
        for name, default in spec.options.items():  # given values and plain defaults, then computed defaults
            value = options.get(name)
            values[name] = default if value is None and not callable(default) else value
        for name, default in spec.options.items():
            if values[name] is None and callable(default):
                values[name] = default(values)
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "options", {name: OPTIONS[name].normalise(v) if v is not None else None
                                             for name, v in values.items()})

    @property
    def spec(self) -> Method:
        return get_method(self.method)

    def __getattr__(self, name: str) -> Any:
        options = self.__dict__.get("options")
        if options is not None and name in options:
            return options[name]
        if name in OPTIONS:
            return None
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self.options:
            raise AttributeError(f"method {self.method!r} has no option {name!r}")
        self.options[name] = OPTIONS[name].normalise(value) if value is not None else None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodConfig) and (self.method, self.options) == (other.method, other.options)

    def __repr__(self) -> str:
        options = "".join(f", {name}={value!r}" for name, value in self.options.items())
        return f"MethodConfig({self.method!r}{options})"

    def to_dict(self) -> dict:
        """The method and its options, JSON-ready (tuples as lists)."""
        return {"method": self.method, **{name: list(v) if isinstance(v, tuple) else v for name, v in self.options.items()}}

    @classmethod
    def from_dict(cls, raw: dict) -> "MethodConfig":
        if not isinstance(raw, dict) or not isinstance(raw.get("method"), str):
            raise ValueError(f"a method configuration must be a JSON object with a 'method' name, got {json.dumps(raw)[:80]}")
        unknown = sorted(set(raw) - set(OPTIONS) - {"method"})
        if unknown:
            raise ValueError(f"unknown method options {unknown}")
        options = dict(raw)
        return cls(options.pop("method"), **options)



# ------------------------------------------------------------------------------------------ combinations
# A combination of methods in one model is a list of MethodConfigs, one per part, everywhere: apply_method's
# argument, a model's applied methods, adapter_config.json's "methods", TrainConfig.method. A single method is a
# one-part combination and stays a plain MethodConfig. Which families may combine is models/peft.py's
# check_combination. As text (--method, compare.py's --methods) the parts are joined with '+'; a part of a
# stacking method can carry its adapter name after ':' (loreft:early+loreft:late).
JOIN, NAMED = "+", ":"
PART_NAME_RULE = "letters, digits, '_' and '-'"


def method_parts(method: "MethodConfig | list[MethodConfig]") -> list["MethodConfig"]:
    """The parts of a method or a combination, as a list."""
    parts = [method] if isinstance(method, MethodConfig) else list(method)
    if not parts or not all(isinstance(part, MethodConfig) for part in parts):
        raise TypeError(f"expected a MethodConfig or a non-empty list of them, got {method!r}")
    return parts


def part_label(part: "MethodConfig") -> str:
    """How the text form writes a part: its method, and after ':' its adapter name when that is neither the
    method's nor the default's."""
    name = part.options.get("name")
    return part.method if name in (None, part.method, "default") else f"{part.method}{NAMED}{name}"


def combination_name(method: "MethodConfig | list[MethodConfig]") -> str:
    """'lora', 'lora+loreft', 'loreft:early+loreft:late': what logs and messages call a method or a combination
    (run directories and prediction files spell it with path_label)."""
    return JOIN.join(part_label(part) for part in method_parts(method))


def path_label(name: str) -> str:
    """A method, combination or variant name as a file or directory name: ':' (before a part's adapter name) is not
    allowed in Windows file names and reads as a drive or a volume elsewhere, so it becomes '-'
    (runs/sst-loreft-early+loreft-late). No built-in stacking method's name holds a '-', so their labels stay
    unambiguous; compare.py refuses two variants whose labels meet."""
    return name.replace(NAMED, "-")


def parse_combination(text: str) -> list[tuple[str, Optional[str]]]:
    """'lora+loreft:late' -> [('lora', None), ('loreft', 'late')]: each part's method and, for a stacking method,
    the adapter name it takes: the one written after ':', else in a combination its method's, so that parts of
    different methods never share one ('loreft+noreft' -> names 'loreft' and 'noreft'). ValueError naming the
    bad part."""
    items = text.split(JOIN)
    parts = []
    for item in items:
        method, named, name = item.strip().partition(NAMED)
        if not method:
            raise ValueError(f"{text!r}: an empty part; join method names with {JOIN!r}")
        stacks = "name" in get_method(method).options
        if named:
            if not stacks:
                raise ValueError(f"{item!r}: only a stacking (ReFT-family) method takes a name after {NAMED!r}")
            if not name or not all(c.isalnum() or c in "_-" for c in name):
                raise ValueError(f"{item!r}: a part's name is made of {PART_NAME_RULE}")
        parts.append((method, name or (method if stacks and len(items) > 1 else None)))
    return parts


def parse_methods(text: str) -> "MethodConfig | list[MethodConfig]":
    """The method or combination that `text` names, with default options: parse_methods('lora+loreft') is
    [MethodConfig('lora'), MethodConfig('loreft', name='loreft')]. The command line builds the same, with flags."""
    parts = [MethodConfig(method, name=name) for method, name in parse_combination(text)]
    return parts[0] if len(parts) == 1 else parts


def method_to_json(method: "MethodConfig | list[MethodConfig]") -> "dict | list[dict]":
    """A method as a JSON object, a combination as a list of them."""
    return method.to_dict() if isinstance(method, MethodConfig) else [part.to_dict() for part in method_parts(method)]


def method_from_json(raw: "dict | list") -> "MethodConfig | list[MethodConfig]":
    """method_to_json's inverse; a one-part list is its one MethodConfig."""
    if isinstance(raw, MethodConfig):
        return raw
    if isinstance(raw, (list, tuple)):
        parts = method_parts([part if isinstance(part, MethodConfig) else MethodConfig.from_dict(part) for part in raw])
        return parts[0] if len(parts) == 1 else parts
    return MethodConfig.from_dict(raw)

# ------------------------------------------------------------------------------------------ checks and parsers
# Each returns the normalised value or raises ValueError with the problem ("must be ..."): OptionError and the
# command line add which option or flag it is.
def at_least_one(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be >= 1, got {value!r}")
    return value


def finite_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {value!r}")
    return float(value)


def probability(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"must be in [0, 1), got {value!r}")
    return float(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def one_of(choices) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    return check


def subset_of(choices) -> Callable[[Any], tuple]:
    """A non-empty list of distinct choices, as a tuple."""
    def check(value: Any) -> tuple:
        items = (value,) if isinstance(value, str) else tuple(value)
        if not items or any(item not in choices for item in items):
            raise ValueError(f"must be among {', '.join(choices)}; got {list(items)}")
        return items
    return check


def comma_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"must be a number, got {text!r}") from None


def parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"must be an integer, got {text!r}") from None
