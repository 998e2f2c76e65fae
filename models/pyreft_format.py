"""pyreft's saved interventions, read and written, for GPT-2 (pyreft 0.1 on pyvene 0.1.8: `ReftModel.save`, `.load`).

    load_adapter(model, "pyreft_dir")                    # models/peft.py recognises the directory: read_pyreft
    load_adapter(model, "pyreft_dir", positions="f1+l1")
    save_adapter(model, "out_dir", format="pyreft")      # save_pyreft

A pyreft directory holds `config.json` (pyvene's IntervenableConfig: one `representations` entry per intervention,
[layer, component, unit, max_number_of_units, low_rank_dimension, ...], the `intervention_types` as class strings,
the `sorted_keys`) and one `intkey_<key>.bin` per intervention (torch.save of its state dict; read here with
weights_only=True, so a file that needs any other Python object is refused). A key reads
`layer_3_comp_block_output_unit_pos_nunit_1#0`: `#n` counts the interventions at the same place.

What maps onto this project: GPT-2's `block_output` (the layer's output: our 'ffn' component), unit 'pos', one
unit. pyreft's classes and ours (R = rotate_layer^T, W and b = learned_source; pyreft has no scale: alpha = rank):

    LoreftIntervention    weight, bias, rotate_layer (d x r)                          -> loreft
    NoreftIntervention    proj_layer.weight (+ .bias, folded into b), learned_source  -> noreft
    DireftIntervention    rotate_layer.parametrizations.weight.*, learned_source      -> direft
    NodireftIntervention  proj_layer.weight (its bias is unused by pyreft), learned_source -> nodireft
    ConsreftIntervention  rotate_layer.parametrizations.weight.*, learned_source (r)  -> consreft
    LobireftIntervention  rotate_layer.parametrizations.weight.*, learned_source (r)  -> lobireft

Positions: pyreft chooses its `unit_locations` at every call and saves none. One intervention per layer loads as
one intervention shared by the chosen positions, by default `l1` (each row's last prompt token, where pyreft's
examples intervene); two per layer (pyreft's untied first/last positions: #0 the first, #1 the last) load untied
as `f1+l1`. `positions=` chooses others (untied: one slot per intervention of a layer). Likewise pyreft does not
save `act_fn`: its default, linear, is assumed, and only the identity activation is written.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from data.atomic import atomic_save
from models.gpt2 import GPT2Model
from models.loading import CheckpointError, read_state_dict
from models.methods import MethodConfig
from modules.reft import LowRankIntervention, ReFTGPT2Layer, parse_positions

CONFIG = "config.json"
COMPONENT = "block_output"  # pyvene's name for GPT-2's block output, our 'ffn' component
ROTATION_KEYS = ("rotate_layer.parametrizations.weight.original", "rotate_layer.parametrizations.weight.0.base")
BUFFER_KEYS = ("embed_dim", "interchange_dim")  # pyvene's buffers, in every state dict but LoReFT's
# pyreft's class -> (our method, the state dict's keys beyond BUFFER_KEYS; optional ones after a '?')
TYPES = {
    "Loreft": ("loreft", ("weight", "bias", "rotate_layer")),
    "Noreft": ("noreft", ("proj_layer.weight", "?proj_layer.bias", "learned_source.weight", "learned_source.bias")),
    "Direft": ("direft", (*ROTATION_KEYS, "learned_source.weight", "learned_source.bias")),
    "Nodireft": ("nodireft", ("proj_layer.weight", "?proj_layer.bias", "learned_source.weight", "learned_source.bias")),
    "Consreft": ("consreft", (*ROTATION_KEYS, "learned_source")),
    "Lobireft": ("lobireft", (*ROTATION_KEYS, "learned_source")),
}
WRITTEN_AS = {method: kind for kind, (method, _) in TYPES.items()} | {"reft": "Nodireft"}  # the adapter form's formula


def is_pyreft_directory(directory: Path) -> bool:
    """pyreft's layout: a config.json beside intkey_*.bin files (and not this project's adapter_config.json)."""
    directory = Path(directory)
    return (directory / CONFIG).is_file() and not (directory / "adapter_config.json").exists() \
        and any(directory.glob("intkey_*.bin"))


# ------------------------------------------------------------------------------------------------ reading
def read_pyreft(directory: Path, gpt: GPT2Model, name: Optional[str] = None,
                positions: Optional[str] = None) -> tuple[MethodConfig, dict]:
    """Reads and checks the interventions pyreft saved in `directory` for `gpt` (which it leaves unchanged): the
    method to apply (one ReFT-family adapter named `name`, default 'default', at `positions`: see the module
    docstring) and the tensors for `copy_interventions`. models/peft.py's load_adapter applies them."""
    directory = Path(directory)
    entries = read_entries(directory, gpt)
    kinds = sorted({entry["kind"] for entry in entries})
    ranks = sorted({entry["rank"] for entry in entries})
    if len(kinds) > 1 or len(ranks) > 1:
        raise ValueError(f"{directory / CONFIG}: interventions of several types or ranks ({', '.join(kinds)}; ranks "
                         f"{ranks}); this project loads one type and rank per adapter")
    per_layer: dict[int, dict[int, dict]] = {}
    for entry in entries:
        per_layer.setdefault(entry["layer"], {})[entry["slot"]] = entry["tensors"]
    counts = {len(group) for group in per_layer.values()}
    if len(counts) > 1 or max(counts) > 2:
        raise ValueError(f"{directory / CONFIG}: {sorted(counts)} interventions per layer; one per layer (positions "
                         "shared) or two (pyreft's untied first and last positions) can be loaded")
    count = counts.pop()
    positions = positions or ("l1" if count == 1 else "f1+l1")
    slots = parse_positions(positions) if positions != "all" else None
    if count > 1 and (slots is None or len(slots) != count):
        raise ValueError(f"{directory}: {count} interventions per layer need positions with {count} slots "
                         f"(one per intervention, such as f1+l1), got {positions!r}")
    layers = sorted(per_layer) if len(per_layer) < gpt.config.n_layer else None  # None: every layer
    config = MethodConfig(TYPES[kinds[0]][0], rank=ranks[0], layers=layers, components=("ffn",),
                          positions=positions, tie_positions=count == 1, name=name)
    return config, per_layer


def copy_interventions(gpt: GPT2Model, name: str, per_layer: dict[int, dict[int, dict]]) -> list[nn.Parameter]:
    """Copies what read_pyreft returned into adapter `name`'s interventions, once it is applied; returns the
    parameters it filled."""
    interventions, filled = interventions_of(gpt, name), []
    with torch.no_grad():
        for layer, group in per_layer.items():
            for slot, tensors in group.items():
                for param_name, tensor in tensors.items():
                    filled.append(interventions[layer][slot].get_parameter(param_name))
                    filled[-1].copy_(tensor)
    return filled


def read_entries(directory: Path, gpt: GPT2Model) -> list[dict]:
    """One dict per saved intervention: layer, slot (#n), kind, rank and our tensors ('source.weight', ...)."""
    path = directory / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read pyreft's config ({error})") from None
    representations, types = (config.get(k) if isinstance(config, dict) else None for k in ("representations",
                                                                                            "intervention_types"))
    if not isinstance(representations, list) or not isinstance(types, list) or len(types) != len(representations):
        raise ValueError(f"{path}: not a pyreft config (expected lists 'representations' and 'intervention_types' "
                         "of one length)")
    d, n_layer = gpt.config.n_embd, gpt.config.n_layer
    seen: dict[str, int] = {}
    entries = []
    for index, (raw, type_name) in enumerate(zip(representations, types)):
        where = f"{path}: representations[{index}]"
        fields = dict(zip(("layer", "component", "unit", "max_number_of_units", "low_rank_dimension"), raw)) \
            if isinstance(raw, list) else raw if isinstance(raw, dict) else {}
        layer, component, unit = fields.get("layer"), fields.get("component"), fields.get("unit", "pos")
        units, rank = fields.get("max_number_of_units", 1), fields.get("low_rank_dimension")
        if (component, unit, units) != (COMPONENT, "pos", 1):
            raise ValueError(f"{where}: component {component!r}, unit {unit!r} x {units!r}; only GPT-2's "
                             f"{COMPONENT!r} with unit 'pos' x 1 maps onto this project")
        if not isinstance(layer, int) or not 0 <= layer < n_layer:
            raise ValueError(f"{where}: layer {layer!r} does not exist: this model has layers 0..{n_layer - 1}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= d:
            raise ValueError(f"{where}: low_rank_dimension must be an integer in 1..{d}, got {rank!r}")
        match = re.search(r"(\w+)Intervention'?>?$", str(type_name))
        if not match or match.group(1) not in TYPES:
            raise ValueError(f"{path}: intervention_types[{index}] is {type_name!r}; readable are pyreft's "
                             + ", ".join(f"{kind}Intervention" for kind in TYPES))
        key = f"layer_{layer}_comp_{COMPONENT}_unit_pos_nunit_1"  # pyvene numbers repeats of a place: #0, #1, ...
        slot = seen[key] = seen.get(key, -1) + 1
        file = directory / f"intkey_{key}#{slot}.bin"
        try:
            state = read_state_dict(file)
        except CheckpointError as error:
            raise ValueError(str(error)) from None
        except FileNotFoundError:
            raise ValueError(f"{file}: missing; {path} names this intervention") from None
        kind = match.group(1)
        entries.append({"layer": layer, "slot": slot, "kind": kind, "rank": rank,
                        "tensors": our_tensors(kind, state, d, rank, file)})
    if not entries:
        raise ValueError(f"{path}: names no interventions")
    return entries


def our_tensors(kind: str, state: dict, d: int, rank: int, file: Path) -> dict[str, torch.Tensor]:
    """One intervention's pyreft state dict -> our LowRankIntervention's parameters, fp32, shapes checked."""
    _, keys = TYPES[kind]
    required = {k for k in keys if not k.startswith("?")}
    allowed = required | {k.lstrip("?") for k in keys} | (set(BUFFER_KEYS) if kind != "Loreft" else set())
    if not required <= set(state) <= allowed:
        raise ValueError(f"{file}: a {kind}Intervention state dict has keys {', '.join(sorted(required))}; this one "
                         f"has {', '.join(sorted(state))}")
    if "embed_dim" in state and state["embed_dim"].numel() == 1 and int(state["embed_dim"]) != d:
        raise ValueError(f"{file}: saved for hidden size {int(state['embed_dim'])}, this model's is {d}")
    s = {k: v.detach().float() for k, v in state.items()}
    if kind == "Loreft":
        ours = {"source.weight": s["weight"], "source.bias": s["bias"], "rotate": s["rotate_layer"].t()}
    elif kind in ("Noreft", "Nodireft"):
        bias = s["learned_source.bias"]
        if kind == "Noreft" and "proj_layer.bias" in s:  # W2^T (W1 h + b1 - (W2 h + b2)): b = b1 - b2
            bias = bias - s["proj_layer.bias"]
        ours = {"source.weight": s["learned_source.weight"], "source.bias": bias, "rotate": s["proj_layer.weight"]}
    else:
        rotate = parametrized_rotation(s[ROTATION_KEYS[0]], s[ROTATION_KEYS[1]], file).t()
        if kind == "Direft":
            ours = {"source.weight": s["learned_source.weight"], "source.bias": s["learned_source.bias"], "rotate": rotate}
        else:
            ours = {"source.bias": s["learned_source"], "rotate": rotate}
    expected = {"source.weight": (rank, d), "source.bias": (rank,), "rotate": (rank, d)}
    wrong = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in ours.items() if tuple(v.shape) != expected[k]]
    if wrong:
        raise ValueError(f"{file}: tensors of another shape for rank {rank}, hidden size {d}: {'; '.join(wrong)}")
    return {k: v.contiguous() for k, v in ours.items()}


def parametrized_rotation(original: torch.Tensor, base: torch.Tensor, file: Path) -> torch.Tensor:
    """rotate_layer.weight (d x r) of a pyreft intervention whose state dict holds torch's orthogonal
    parametrisation (`original`, `base`): computed by that parametrisation itself, as pyreft does."""
    holder = nn.Module()
    holder.weight = nn.Parameter(torch.empty(original.shape))
    with torch.random.fork_rng(devices=[]):  # registering completes a basis with random numbers
        torch.nn.utils.parametrizations.orthogonal(holder)
    try:
        holder.load_state_dict({"parametrizations.weight.original": original, "parametrizations.weight.0.base": base})
    except RuntimeError as error:
        raise ValueError(f"{file}: the rotation's parametrisation does not fit ({str(error).splitlines()[-1].strip()})") from None
    with torch.no_grad():
        return holder.weight.detach().clone()


def interventions_of(gpt: GPT2Model, name: str) -> dict[int, list[LowRankIntervention]]:
    """Layer index -> the LowRankInterventions of adapter `name` at that layer's output ('ffn'), by slot."""
    found = {}
    for index, block in enumerate(gpt.h):
        for module in block.modules():
            if isinstance(module, ReFTGPT2Layer) and name in module.interventions["ffn"]:
                found[index] = list(module.interventions["ffn"][name].interventions)
    return found


# ------------------------------------------------------------------------------------------------ writing
def save_pyreft(model: nn.Module, gpt: GPT2Model, methods: list[MethodConfig], directory: Path) -> Path:
    """Writes the one ReFT-family adapter (`methods`, applied to `model`'s `gpt`) as pyreft saves it (config.json,
    intkey_*.bin). Refused, naming what stands in the way, for what pyreft's files cannot hold: other trained
    tensors (a task head, LoRA), several adapters, the attention component, a scale other than 1 (alpha != rank)
    or an activation (pyreft does not save act_fn)."""
    directory = Path(directory)
    refuse = f"save_adapter(format='pyreft') to {directory}:"
    if len(methods) != 1 or methods[0].method not in WRITTEN_AS:
        raise ValueError(f"{refuse} pyreft's files hold one ReFT-family adapter ({', '.join(WRITTEN_AS)}); this "
                         f"model has {', '.join(m.method for m in methods) or 'no method'}")
    config = methods[0]
    if tuple(config.components) != ("ffn",):
        raise ValueError(f"{refuse} only the 'ffn' component (the layer's output, pyreft's block_output) maps onto "
                         f"pyreft; this adapter intervenes at {','.join(config.components)}")
    if config.alpha != config.rank:
        raise ValueError(f"{refuse} pyreft's interventions have no scale; this adapter's alpha/rank is "
                         f"{config.alpha:g}/{config.rank} (train with alpha = rank)")
    if config.activation not in (None, "identity"):
        raise ValueError(f"{refuse} pyreft does not save an intervention's act_fn; this adapter's activation is "
                         f"{config.activation!r} (only identity is written)")
    interventions = interventions_of(gpt, config.name)
    owned = {id(p) for group in interventions.values() for module in group for p in module.parameters()}
    others = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in owned]
    if others:
        raise ValueError(f"{refuse} pyreft's files hold interventions only; this model also trains "
                         f"{', '.join(others[:6])}{' ...' if len(others) > 6 else ''}")
    kind = WRITTEN_AS[config.method]
    d = gpt.config.n_embd
    slots = max(len(group) for group in interventions.values())
    order = [(layer, slot) for slot in range(slots) for layer in sorted(interventions)]  # pyreft: layers, then repeats
    states = {}
    for layer, slot in order:
        states[f"layer_{layer}_comp_{COMPONENT}_unit_pos_nunit_1#{slot}"] = pyreft_state(kind, interventions[layer][slot], d)
    saved = {
        "intervention_constant_sources": [True] * len(order),
        "intervention_dimensions": [d] * len(order),
        "intervention_types": [f"<class 'pyreft.interventions.{kind}Intervention'>"] * len(order),
        "mode": "parallel",
        "representations": [[layer, COMPONENT, "pos", 1, config.rank] + [None] * 9 for layer, _ in order],
        "sorted_keys": list(states),
    }
    directory.mkdir(parents=True, exist_ok=True)
    for key, state in states.items():
        atomic_save(lambda temp, state=state: torch.save(state, temp), directory / f"intkey_{key}.bin")
    atomic_save(lambda temp: Path(temp).write_text(json.dumps(saved, indent=2) + "\n"), directory / CONFIG)
    return directory


def pyreft_state(kind: str, intervention: LowRankIntervention, d: int) -> dict[str, torch.Tensor]:
    """Our intervention -> the state dict pyreft's `kind` class saves (and its load_state_dict accepts)."""
    tensors = {name: p.detach().cpu().contiguous() for name, p in intervention.named_parameters()}
    rotate = intervention.projection().detach().cpu().contiguous()  # the R in use (orthonormalised where it is)
    buffers = {"embed_dim": torch.tensor(d), "interchange_dim": torch.tensor(d)}
    if kind == "Loreft":
        return {"weight": tensors["source.weight"], "bias": tensors["source.bias"], "rotate_layer": rotate.t().contiguous()}
    if kind in ("Noreft", "Nodireft"):
        return {"proj_layer.weight": rotate, "learned_source.weight": tensors["source.weight"],
                "learned_source.bias": tensors["source.bias"], **buffers}
    rotation = dict(zip(ROTATION_KEYS, trivialised_rotation(rotate.t())))
    if kind == "Direft":
        return {**rotation, "learned_source.weight": tensors["source.weight"],
                "learned_source.bias": tensors["source.bias"], **buffers}
    return {**rotation, "learned_source": tensors["source.bias"], **buffers}


def trivialised_rotation(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(original, base) of torch's orthogonal parametrisation (householder map, trivialisation) whose weight is
    `weight` (d x r, orthonormal columns) exactly: base is an orthogonal d x d matrix whose first r columns are
    `weight`, and original is -I (d x r), which the householder map sends to the first r columns of the identity."""
    d, r = weight.shape
    generator = torch.Generator().manual_seed(0)
    completion = torch.linalg.qr(torch.cat([weight, torch.randn(d, d - r, generator=generator)], dim=1))[0]
    base = torch.cat([weight, completion[:, r:]], dim=1).contiguous()
    original = torch.zeros(d, r)
    original.diagonal().fill_(-1.0)
    return original, base
