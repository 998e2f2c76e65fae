"""The README's tables of methods and method flags and its note on combinations, generated from the registry
(models/methods.py), so that they cannot drift from the code: `python -m models.method_table` prints them, and
a test checks the README holds exactly these."""
from __future__ import annotations

import sys

import torch

from models.config import GPT2Config
from models.gpt2 import GPT2Model
from models.methods import EXAMPLE_COMBINATION, OPTIONS, MethodConfig, flag_options, parse_methods, registered_methods
from models.peft import AT_MOST_ONE, apply_method


def gpt2_trainable_count(method: "str | MethodConfig | list[MethodConfig]") -> int:
    """GPT-2 parameters a method, or a combination ('lora+loreft' or a list of parts), trains at the gpt2 shape
    (by name: with its defaults), counted on the meta device: no memory, no weights."""
    with torch.device("meta"):
        gpt = GPT2Model(GPT2Config.preset("gpt2"))
    apply_method(gpt, parse_methods(method) if isinstance(method, str) else method)
    return sum(p.numel() for p in gpt.parameters() if p.requires_grad)


def method_table() -> str:
    base = gpt2_trainable_count("full")
    lines = ["| `--method` | what trains | options (default) | trainable on gpt2 |", "|---|---|---|---|"]
    for method in registered_methods():
        flags = [f"`{OPTIONS[name].flag}` ({OPTIONS[name].describe(default)})"
                 for name, default in method.options.items() if OPTIONS[name].flag]
        count = gpt2_trainable_count(method.name)
        if not method.adapts_gpt2:
            shown = f"{count:,} (+ head)"
        else:
            percent = 100 * count / (base + (count if method.freezes_base else 0))
            shown = f"{count:,} ({percent:.2g}%)" if percent < 99.95 else f"{count:,} (100%)"
        lines.append(f"| `{method.name}` | {method.trains} | {', '.join(flags)} | {shown} |")
    return "\n".join(lines)


def combination_note() -> str:
    """The README's paragraph on combinations: who may combine (from the methods' families) and how the counts
    add up, on an example."""
    def members(family: str) -> str:
        return ", ".join(f"`{m.name}`" for m in registered_methods() if m.family == family) or "none yet"

    parts = EXAMPLE_COMBINATION.split("+")
    sums = " + ".join(f"{gpt2_trainable_count(part):,} ({part})" for part in parts)
    return (f"Methods combine in one model with `+`: at most one {AT_MOST_ONE['weights']} ({members('weights')}), any "
            f"number of ReFT-family adapters ({members('reft')}) and at most one {AT_MOST_ONE['prompt']} "
            f"({members('prompt')}); {members('base')} and {members('head')} stand alone. Counts add up: "
            f"`{EXAMPLE_COMBINATION}` trains {sums} = {gpt2_trainable_count(EXAMPLE_COMBINATION):,} on gpt2.")


def option_table() -> str:
    lines = ["| flag | meaning | methods |", "|---|---|---|"]
    for option in flag_options():
        users = [m.name for m in registered_methods() if option.name in m.options]
        choices = f" ({' / '.join(option.choices)})" if option.choices else ""
        lines.append(f"| `{option.flag}` | {option.help}{choices} | {', '.join(users)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.stdout.write(method_table() + "\n\n" + combination_note() + "\n\n" + option_table() + "\n")
