"""Applying fine-tuning methods to a loaded GPT2Model, counting what trains, and adapter files.

    config = MethodConfig(method="loreft", rank=4, positions="f1+l1")
    apply_method(model.gpt, config)        # freezes the base, adds the trainable parts, in place
    apply_method(other.gpt, [MethodConfig("lora"), MethodConfig("loreft", rank=1)])   # a combination
    ...train...
    save_adapter(model, "runs/sst-loreft/best")   # only the trained tensors + the config as JSON
    load_adapter(fresh_model, "runs/sst-loreft/best")
    save_adapter(lora_model, "for-peft", format="peft")   # peft's LoRA/DoRA/IA3 format (models/peft_format.py)

The methods themselves are declared in models/methods.py; nothing here names one. Task code never branches on
the method: it builds its model, calls apply_method, and trains whatever requires a gradient (the method's
parts and the task head).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from data.atomic import atomic_save
from models import pyreft_format
from models.base_identity import base_identity, check_same_base
from models.gpt2 import GPT2Model
from models.methods import (MethodConfig, combination_name, method_from_saved, method_parts, registered_methods,
                            saved_form, tokenize_text_options)
from models.peft_format import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_adapter, peft_adapter_files, read_peft_adapter

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
ADAPTER_FORMAT = "gpt2-peft-adapter"
BASE_FIELDS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")  # the base shape an adapter records
log = logging.getLogger(__name__)
# The adapter format's version. 2: orthonormal ReFT projections keep an orthonormal R as it is (version 1's QR could
# flip its rows' signs), and `direft` means pyreft's DiReFT (version 1's `direft` is today's `nodireft`). Older
# files load to the outputs they had: their modules' `upgrade_saved(version)` converts what they loaded.
ADAPTER_VERSION = 2
FORMATS = ("native", "pyreft", "peft")  # save_adapter's `format`: this project's files, pyreft's or peft's


# ---------------------------------------------------------------------------------------- applying
# A combination applies its parts in this order of families, whatever order it is written in: the weight-space
# method first (it selects or wraps GPT-2's own weights, which the other families' wrappers hide), then the
# soft prompt, then the ReFT adapters (they wrap whole layers, whatever is inside).
APPLY_ORDER = ("base", "head", "weights", "prompt", "reft")
ALONE = ("base", "head")  # families that cannot share a model with any other method
AT_MOST_ONE = {"weights": "weight-space method", "prompt": "soft-prompt method"}


def apply_method(gpt: GPT2Model, config: MethodConfig | Sequence[MethodConfig], tokenizer=None) -> GPT2Model:
    """Applies a method, or a combination (a list of MethodConfigs, one per part), to `gpt` in place and records
    the parts in `gpt.peft_methods`. The base is frozen first, together with whatever an earlier call applied;
    the parts of this call are then the only trainable GPT-2 parameters (check_combination says which parts
    can share a model). With a `tokenizer`, text options (--prompt-init-text) are recorded with their token ids,
    so the record needs no tokenizer."""
    if not isinstance(gpt, GPT2Model):
        raise TypeError(f"apply_method expects a GPT2Model, got {type(gpt).__name__}")
    parts, applied = method_parts(config), applied_methods(gpt)
    if tokenizer is not None:
        parts = [tokenize_text_options(part, tokenizer) for part in parts]
    check_can_apply(gpt, parts)
    layers = [resolve_layers(part.layers, gpt.config.n_layer) for part in parts]
    order = sorted(range(len(parts)), key=lambda i: APPLY_ORDER.index(parts[i].spec.family))
    if any(part.spec.freezes_base for part in parts):
        gpt.requires_grad_(False)
    owned: list[list[nn.Parameter]] = [[] for _ in parts]
    for i in order:
        # What this part made trainable is its own, even if a later part's wrapper freezes it again (a ReFT
        # wrapper freezes the layer it wraps, LoRA's adapters and BitFit's biases included): all of it trains.
        parts[i].spec.apply(gpt, parts[i], layers[i])
        taken = {id(p) for params in owned for p in params}
        owned[i] = [p for p in gpt.parameters() if p.requires_grad and id(p) not in taken]
    for params in owned:
        for param in params:
            param.requires_grad_(True)
    gpt.peft_methods = applied + [parts[i] for i in order]
    gpt.peft_parameters = list(getattr(gpt, "peft_parameters", [[] for _ in applied])) + [owned[i] for i in order]
    # New parts are created in fp32 on the CPU, in train mode: follow the model's device and mode, and re-apply
    # its precision so that nothing frozen is left in fp32.
    gpt.to(gpt.wte.weight.device).train(gpt.training)
    return gpt.set_precision(gpt.precision)


def check_combination(parts: Sequence[MethodConfig]) -> None:
    """The rule for methods sharing one model: at most one weight-space method (family "weights"), any number of
    ReFT-family adapters ("reft", each under its own name) and at most one soft-prompt method ("prompt");
    full fine-tuning ("base") and head-only training ("head") stand alone. ValueError naming the parts."""
    parts = method_parts(parts)
    if len(parts) < 2:
        return
    text = combination_name(parts)
    alone = [part.method for part in parts if part.spec.family in ALONE]
    if alone:
        raise ValueError(f"{text}: {alone[0]} cannot be combined with other methods (a combination is at most one "
                         f"weight-space method ({family_members('weights')}), any number of ReFT-family adapters "
                         f"({family_members('reft')}) and at most one soft-prompt method"
                         + (f" ({family_members('prompt')})" if family_members("prompt") else "") + ")")
    for family, words in AT_MOST_ONE.items():
        members = [part.method for part in parts if part.spec.family == family]
        if len(members) > 1:
            raise ValueError(f"{text}: at most one {words} per model, got {' and '.join(members)}")
    stacking = [part for part in parts if part.spec.stacks]
    names = [part.name for part in stacking]
    twice = next((part for part in stacking if names.count(part.name) > 1), None)
    if twice is not None:
        m = twice.method
        raise ValueError(f"{text}: two ReFT-family parts are both named {twice.name!r}; give each its own name (on the "
                         f"command line {m}:early+{m}:late, in Python MethodConfig({m!r}, name='late'))")


def check_can_apply(gpt: GPT2Model, parts: list[MethodConfig]) -> None:
    """Whether `parts` can join what `gpt` already has (the combination rule), before anything changes."""
    applied = applied_methods(gpt)
    for part in parts:
        if part.spec.stacks and any(m.spec.stacks and m.name == part.name for m in applied):
            raise ValueError(f"an adapter named {part.name!r} is already applied; give the new one another name")
    if not applied:
        check_combination(parts)
        return
    try:
        check_combination(applied + parts)
    except ValueError as error:
        raise ValueError(f"this model already has {combination_name(applied)} applied, so "
                         f"{combination_name(parts)} cannot be added: {error} (start from a freshly loaded base "
                         "model)") from None
    late = [m.method for m in applied if APPLY_ORDER.index(m.spec.family) > APPLY_ORDER.index("weights")]
    early = [part.method for part in parts if part.spec.family == "weights"]
    if late and early:
        raise ValueError(f"this model already has {', '.join(late)} applied; a weight-space method ({early[0]}) must "
                         f"come first: apply both in one call, apply_method(gpt, [{early[0]}, {late[0]}])")


def family_members(family: str) -> str:
    return ", ".join(m.name for m in registered_methods() if m.family == family)


def trainable_by_method(gpt: GPT2Model) -> list[tuple[MethodConfig, list[nn.Parameter]]]:
    """Each applied method (each part of a combination) with the parameters it trains: what it added or
    unfroze, less what a later call froze. The trainer gives each part its own learning rate with these."""
    owned = getattr(gpt, "peft_parameters", [])
    return [(method, [p for p in params if p.requires_grad]) for method, params in zip(applied_methods(gpt), owned)]


def applied_methods(gpt: GPT2Model) -> list[MethodConfig]:
    return list(getattr(gpt, "peft_methods", []))


def resolve_layers(layers: Optional[list[int]], n_layer: int) -> list[int]:
    if isinstance(layers, str):  # 'auto:K'
        raise ValueError(f"layers {layers!r} must be chosen before the method is applied: run_training does this "
                         "(tasks/layer_choice.py), or pass layer indices")
    if layers is None:
        return list(range(n_layer))
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"layers {bad} do not exist: this model has layers 0..{n_layer - 1}")
    return list(layers)


def set_lora_merged(gpt: GPT2Model, merged: bool) -> None:
    """Folds every weight update that can be folded (LoRA's) into its weight, for inference at base-model cost,
    or undoes it. A module takes part by having `merged`, `merge()` and `unmerge()`."""
    for module in gpt.modules():
        if hasattr(module, "merged") and callable(getattr(module, "merge", None)):
            module.merge() if merged else module.unmerge()


def virtual_positions(config: MethodConfig | Sequence[MethodConfig]) -> int:
    """How many positions a method or a combination puts before every input (its virtual tokens: soft prompts,
    prefixes; at most one part has them), known before it is applied, so that a task can leave them room."""
    return sum(part.num_virtual_tokens or 0 for part in method_parts(config))


def fold_methods(gpt: GPT2Model) -> GPT2Model:
    """Replaces every training-only reparametrisation (P-tuning's encoder, a prefix projection: modules with
    `folded()`) by the plain tensors it produces, and records the methods as their saved forms: the model is then
    what its adapter file reloads as, with the same outputs."""
    for name, module in list(gpt.named_modules()):
        if callable(getattr(module, "folded", None)):
            folded = module.folded()
            if folded is not module:
                parent, _, attribute = name.rpartition(".")
                setattr(gpt.get_submodule(parent), attribute, folded.to(gpt.wte.weight.device).train(module.training))
                old = {id(p) for p in module.parameters()}  # each method's parameters: the folded ones replace them
                gpt.peft_parameters = [[p for p in params if id(p) not in old]
                                       + (list(folded.parameters()) if any(id(p) in old for p in params) else [])
                                       for params in getattr(gpt, "peft_parameters", [])]
    gpt.peft_methods = [saved_form(m) for m in applied_methods(gpt)]
    return gpt


# ---------------------------------------------------------------------------------------- counting
def parameter_summary(module: nn.Module) -> dict:
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def format_parameter_summary(module: nn.Module) -> str:
    s = parameter_summary(module)
    return f"trainable params: {s['trainable']:,} || all params: {s['total']:,} || trainable%: {s['percent']:.4f}"


# ---------------------------------------------------------------------------------------- adapter files
def find_gpt2(model: nn.Module) -> GPT2Model:
    for module in model.modules():
        if isinstance(module, GPT2Model):
            return module
    raise TypeError(f"{type(model).__name__} contains no GPT2Model")


def base_shape(gpt: GPT2Model) -> dict:
    return {name: getattr(gpt.config, name) for name in BASE_FIELDS}


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors by parameter name, on the CPU: what an adapter file and a resume checkpoint hold (no
    copy on a CPU: write them before the next optimizer step)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def adapter_tensors(model: nn.Module, gpt: GPT2Model) -> dict[str, torch.Tensor]:
    """The tensors an adapter file keeps: every applied method's parts (`adapter_parts`) and whatever else trains,
    where a part with a training-only reparametrisation (a module with `folded()`) contributes its folded form's
    tensors instead of its own."""
    tensors = {**adapter_parts(model, gpt), **trained_tensors(model)}
    for name, module in model.named_modules():
        prefix = name + "."
        if callable(getattr(module, "folded", None)) and any(key.startswith(prefix) for key in tensors):
            tensors = {key: t for key, t in tensors.items() if not key.startswith(prefix)}
            tensors.update({prefix + key: p.detach().cpu().contiguous() for key, p in module.folded().named_parameters()})
    return tensors


def save_adapter(model: nn.Module, directory: str | Path, format: str = "native") -> Path:
    """Saves the trainable tensors of `model` (the method's parts and any task head) to adapter.safetensors
    and the applied methods with the base model's shape to adapter_config.json. Returns the directory.
    `format="pyreft"` writes pyreft's files instead (ReFT-family interventions only; models/pyreft_format.py);
    `format="peft"` peft's LoRA/DoRA/(IA)^3 format (models/peft_format.py), which peft loads.
    A training-only reparametrisation is saved folded (`adapter_tensors`), as the method's saved form."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if format not in FORMATS:
        raise ValueError(f"save_adapter: format must be one of {', '.join(FORMATS)}, got {format!r}")
    gpt = find_gpt2(model)
    if format == "pyreft":
        return pyreft_format.save_pyreft(model, gpt, applied_methods(gpt), directory)
    if format == "peft":
        return save_peft_adapter(model, directory)
    tensors = adapter_tensors(model, gpt)
    atomic_save(lambda temp: save_file(tensors, temp, metadata={"format": ADAPTER_FORMAT}), directory / ADAPTER_WEIGHTS)
    config = {
        "format": ADAPTER_FORMAT,
        "version": ADAPTER_VERSION,
        "methods": [saved_form(m).to_dict() for m in applied_methods(gpt)] or [MethodConfig("full").to_dict()],
        "base": base_shape(gpt),
        "base_model": base_identity(gpt),  # name or path, and a fingerprint of the weights it was trained on
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
    }
    atomic_save(lambda temp: Path(temp).write_text(json.dumps(config, indent=2) + "\n"), directory / ADAPTER_CONFIG)
    return directory


def adapter_file_size(directory: str | Path) -> int:
    """Bytes on disk of a saved adapter (weights + config)."""
    return sum((Path(directory) / name).stat().st_size for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG))


def read_adapter_config(directory: Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no adapter config here (is {directory} an adapter directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read the adapter config ({error})") from None
    if not isinstance(config, dict) or config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not a {ADAPTER_FORMAT} config")
    version = config.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= ADAPTER_VERSION:
        raise ValueError(f"{path}: adapter format version {version!r}, but this code reads versions 1 to "
                         f"{ADAPTER_VERSION} (an adapter written by a newer version of this project needs that version)")
    return config


def check_adapter_config(config: dict, directory: Path) -> list[MethodConfig]:
    """The methods of an adapter config, once its layout is checked: `methods` a non-empty list of method objects,
    `base` an object with the base shape's fields as positive integers, `tensors` (when there) a count. A problem
    is one ValueError naming the config file."""
    where = Path(directory) / ADAPTER_CONFIG
    methods, base = config.get("methods"), config.get("base")
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"{where}: 'methods' must be a non-empty list of the applied methods, got {methods!r:.80}")
    if not isinstance(base, dict):
        raise ValueError(f"{where}: 'base' must be an object with the base model's shape ({', '.join(BASE_FIELDS)}), "
                         f"got {base!r:.80}")
    for field in BASE_FIELDS:
        value = base.get(field)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: base.{field} must be a positive integer, got {value!r}")
    count = config.get("tensors", 0)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"{where}: 'tensors' must be the number of tensors in {ADAPTER_WEIGHTS}, got {count!r}")
    parsed = []
    for index, raw in enumerate(methods):
        try:
            parsed.append(method_from_saved(raw, config["version"]))
        except ValueError as error:
            raise ValueError(f"{where}: methods[{index}]: {error}") from None
    return parsed


def check_against_applied(methods: list[MethodConfig], applied: list[MethodConfig], tensors: dict,
                          model: nn.Module) -> None:
    """An adapter whose tensors are named like those of a method already on the model, of the same name, but shaped
    otherwise (LoReFT rank 4 onto a model with a rank-8 LoReFT 'default'): say which options differ, rather than
    that the name is taken. (Differently named tensors are another adapter, which needs another name.)"""
    params = dict(model.named_parameters())
    if not tensors or not set(tensors) <= set(params) or all(params[k].shape == t.shape for k, t in tensors.items()):
        return
    for method in methods:
        same = [a for a in applied if a.method == method.method and a != method and
                (not method.spec.stacks or a.name == method.name)]
        if same:
            other, called = same[0], f" {method.name!r}" if method.spec.stacks else ""
            options = ", ".join(f"{key} {value!r} in the adapter, {other.options[key]!r} on this model"
                                for key, value in method.options.items() if other.options.get(key) != value)
            raise ValueError(f"the adapter's {method.method}{called} does not fit the {method.method}{called} this model "
                             f"already has ({options}): its tensors have other shapes; load it onto a freshly loaded "
                             "base model")


def check_complete(tensors: dict, expected: set[str], config: dict, model: nn.Module, directory: Path) -> None:
    """Refuses an adapter file that lacks a tensor, which would otherwise keep its fresh initial value (silently
    different outputs): every part of the adapter's methods (`expected`), and as many tensors as its config says
    were saved (which covers a task head)."""
    weights = Path(directory) / ADAPTER_WEIGHTS
    missing = sorted(expected - set(tensors))
    if missing:
        raise ValueError(f"{weights}: lacks {len(missing)} tensor(s) of its methods: {', '.join(missing[:8])}; the "
                         "file is damaged or was written by another program")
    recorded = config.get("tensors")
    if recorded is not None and recorded != len(tensors):
        prefix = gpt_prefix(model, find_gpt2(model))  # the parameters outside GPT-2 (a task head) are the suspects
        likely = sorted(key for key, _ in model.named_parameters()
                        if prefix and not key.startswith(prefix) and key not in tensors)
        raise ValueError(f"{weights}: holds {len(tensors)} tensors, but {ADAPTER_CONFIG} says {recorded} were saved"
                         + (f" (perhaps missing: {', '.join(likely[:8])})" if likely else ""))


def load_adapter(model: nn.Module, directory: str | Path, name: Optional[str] = None,
                 trainable: bool = False, positions: Optional[str] = None,
                 allow_other_base: bool = False) -> nn.Module:
    """Loads an adapter saved by save_adapter into `model` (built on a freshly loaded base of the same
    shape): applies the recorded methods unless already applied, then copies every saved tensor.
    A combination's parts are applied in one apply_method call. `name` renames a stacking (ReFT-family) adapter,
    so that two adapters saved under one name can be combined.
    A directory of pyreft's files (config.json + intkey_*.bin) is read by models/pyreft_format.py; `positions`
    then says which prompt tokens its interventions edit (pyreft does not save them; default l1). A directory
    peft wrote (a LoRA, DoRA or (IA)^3 adapter for transformers' GPT-2) is recognised by its config and converted.
    Every check runs before the model changes, so a file that does not fit leaves the model as it was; every
    error names the adapter directory. A base with other weights than the recorded one (models/base_identity.py)
    is refused unless `allow_other_base`, which only warns.

    What trains afterwards: the loaded tensors are frozen, or trainable with `trainable=True` (to train the
    adapter further); every other parameter keeps the trainability it had, so loading a second ReFT adapter
    leaves the first as it was. On a fresh base, the method freezes GPT-2's own weights as apply_method does. The
    `models.peft` logger says at INFO what was loaded and what is trainable now."""
    directory = Path(directory)
    try:
        if pyreft_format.is_pyreft_directory(directory):
            return load_pyreft_files(model, directory, name, trainable, positions)
        if positions is not None:
            raise ValueError("`positions` applies to pyreft directories only; this adapter records its own")
        if is_peft_adapter(directory):
            return load_peft_adapter(model, directory, name, trainable)
        return load_adapter_files(model, directory, name, trainable, allow_other_base)
    except ValueError as error:
        if str(directory) in str(error):
            raise
        raise ValueError(f"{directory}: {error}") from None


def load_adapter_files(model: nn.Module, directory: Path, name: Optional[str], trainable: bool,
                       allow_other_base: bool = False) -> nn.Module:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    config = read_adapter_config(directory)
    methods = check_adapter_config(config, directory)
    gpt = find_gpt2(model)
    saved_shape, shape = config["base"], base_shape(gpt)
    different = {k: (v, shape.get(k)) for k, v in saved_shape.items() if shape.get(k) != v}
    if different:
        details = ", ".join(f"{k} {saved} vs {ours}" for k, (saved, ours) in different.items())
        raise ValueError(f"{directory}: adapter was trained on a base model of another shape (adapter vs this model: {details})")
    if not any(m.spec.family == "base" for m in methods):  # a full fine-tuning file replaces every base weight
        check_same_base(config.get("base_model"), gpt, str(directory), allow_other_base)
    try:
        tensors = load_file(directory / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: cannot read the adapter weights ({error})") from None
    if name is not None:
        if len(methods) != 1 or not methods[0].spec.stacks:
            raise ValueError(f"{directory}: only a single stacking (ReFT-family) adapter can be loaded under a new name")
        renamed = MethodConfig.from_dict({**methods[0].to_dict(), "name": name})
        keys = renamed_keys(model, gpt, methods[0], renamed)
        tensors = {keys.get(key, key): tensor for key, tensor in tensors.items()}
        methods = [renamed]
    return install_adapter(model, gpt, methods, tensors, directory, config, trainable)


def install_adapter(model: nn.Module, gpt: GPT2Model, methods: list[MethodConfig], tensors: dict[str, torch.Tensor],
                    directory: Path, config: dict, trainable: bool) -> nn.Module:
    """Applies `methods` to `gpt` unless already applied and copies `tensors` (by parameter name in `model`) in,
    after checking every name and shape, so that a file that does not fit leaves the model as it was. `config` is
    the adapter's (its tensor count and version are checked)."""
    applied = applied_methods(gpt)
    # A model holding the training form of a saved method (the trainer reloading its best epoch) is folded first.
    folded = [saved_form(m) for m in applied]
    fold = any(m in methods and m not in applied for m in folded)
    target = folded if fold else applied
    check_against_applied(methods, target, tensors, model)
    missing = [m for m in methods if m not in target]
    if missing or fold:
        if missing:
            check_can_apply(gpt, missing)  # the combination rule, before a skeleton is built
        shapes, expected = skeleton_parameters(model, gpt, target + missing, wanted=methods)
    else:  # the methods are there already: check against the model itself (and the tensor count)
        shapes, expected = {key: p.shape for key, p in model.named_parameters()}, set()
    unknown = sorted(k for k in tensors if k not in shapes)
    wrong = sorted(k for k in tensors if k in shapes and shapes[k] != tensors[k].shape)
    if unknown or wrong:
        raise ValueError(
            f"{directory}: adapter does not fit this model"
            + (f"; tensors the model does not have: {', '.join(unknown[:8])}" if unknown else "")
            + (f"; tensors of another shape: {', '.join(wrong[:8])}" if wrong else "")
        )
    check_complete(tensors, expected, config, model, directory)

    def copy() -> list[nn.Parameter]:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, tensor in tensors.items():
                params[key].copy_(tensor)
        if config["version"] < ADAPTER_VERSION:
            modules = dict(model.named_modules())
            for owner in sorted({key.rpartition(".")[0] for key in tensors}):
                if hasattr(modules[owner], "upgrade_saved"):
                    modules[owner].upgrade_saved(config["version"])
        return [params[key] for key in tensors]

    return apply_loaded(model, gpt, missing, copy, trainable, directory, methods, fold)


def load_pyreft_files(model: nn.Module, directory: Path, name: Optional[str], trainable: bool,
                      positions: Optional[str]) -> nn.Module:
    gpt = find_gpt2(model)
    method, tensors = pyreft_format.read_pyreft(directory, gpt, name=name, positions=positions)
    return apply_loaded(model, gpt, [method], lambda: pyreft_format.copy_interventions(gpt, method.name, tensors),
                        trainable, directory, [method])


def apply_loaded(model: nn.Module, gpt: GPT2Model, missing: list[MethodConfig], copy, trainable: bool,
                 directory: Path, methods: list[MethodConfig], fold: bool = False) -> nn.Module:
    """Folds the model first with `fold` (fold_methods), applies the `missing` methods, then `copy()` fills in the
    loaded tensors and returns the parameters it filled: those are frozen unless `trainable`; every other
    parameter keeps the trainability it had."""
    applied = applied_methods(gpt)
    flags = {param: param.requires_grad for param in model.parameters()}
    if fold:
        fold_methods(gpt)
    if missing:
        apply_method(gpt, missing)  # one call, as a combination is applied
    loaded = copy()
    if applied:  # apply_method froze all of GPT-2, earlier adapters included: they keep what they had
        for param, flag in flags.items():
            param.requires_grad_(flag)
    for param in loaded:
        param.requires_grad_(trainable)
    log.info("%s: loaded %d tensors of %s, %s; %s", directory, len(loaded), ", ".join(m.method for m in methods),
             "trainable" if trainable else "frozen (load_adapter(..., trainable=True) to train them)",
             format_parameter_summary(model))
    return model


def adapter_parts(model: nn.Module, gpt: GPT2Model) -> dict[str, torch.Tensor]:
    """The tensors of every method applied to `gpt`, trainable or not (a loaded, frozen adapter is still part of the
    model): what save_adapter writes besides the trainable tensors."""
    applied = applied_methods(gpt)
    if not applied:
        return {}
    _, parts = skeleton_parameters(model, gpt, applied, wanted=applied)
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if name in parts}


def skeleton_shapes(model: nn.Module, gpt: GPT2Model, methods: list[MethodConfig]) -> dict[str, torch.Size]:
    """The parameter names and shapes, in order, that `model` would have if its `gpt` were a fresh base with
    `methods` applied, found on a skeleton of the same shape on the meta device (no memory, no change to the
    model)."""
    return skeleton_parameters(model, gpt, methods)[0]


def skeleton_parameters(model: nn.Module, gpt: GPT2Model, methods: list[MethodConfig],
                        wanted: Optional[list[MethodConfig]] = None) -> tuple[dict[str, torch.Size], set[str]]:
    """skeleton_shapes, and the names of the parameters that the `wanted` methods among them train (what each makes
    trainable as it is applied, on the meta skeleton): the parts an adapter of those methods holds."""
    with torch.device("meta"):
        skeleton = GPT2Model(gpt.config)
    prefix = gpt_prefix(model, gpt)
    trained = set()  # by identity: a later part's wrapper renames what an earlier one added (h.0.lora -> h.0.layer.lora)
    for method in methods:
        apply_method(skeleton, method)
        if wanted is not None and method in wanted:
            trained |= {id(p) for p in skeleton.parameters() if p.requires_grad}
    parts = {prefix + name for name, p in skeleton.named_parameters() if id(p) in trained}
    shapes = {name: p.shape for name, p in model.named_parameters() if not name.startswith(prefix)} if prefix else {}
    shapes.update({prefix + name: p.shape for name, p in skeleton.named_parameters()})
    return shapes, parts


def gpt_prefix(model: nn.Module, gpt: GPT2Model) -> str:
    """'gpt.' when `model` holds `gpt` as its attribute gpt, '' when it is `gpt`."""
    prefix = next(name for name, module in model.named_modules() if module is gpt)
    return prefix + "." if prefix else ""


def renamed_keys(model: nn.Module, gpt: GPT2Model, method: MethodConfig, renamed: MethodConfig) -> dict[str, str]:
    """Key in an adapter file saved from a model holding `method` alone -> the key of the same tensor once it is
    applied as `renamed` (the same method under another name) beside what `gpt` already has. Both sets of keys
    come from skeletons, paired in order."""
    base = skeleton_shapes(model, gpt, [])
    saved = [key for key in skeleton_shapes(model, gpt, [method]) if key not in base]
    present = dict(model.named_parameters())
    added = [key for key in skeleton_shapes(model, gpt, applied_methods(gpt) + [renamed]) if key not in present]
    return dict(zip(saved, added))


# ---------------------------------------------------------------------------------------- peft's format
def load_peft_adapter(model: nn.Module, directory: Path, name: Optional[str] = None, trainable: bool = False) -> nn.Module:
    """A LoRA, DoRA or (IA)^3 adapter saved by peft for transformers' GPT-2, converted (models/peft_format.py) and
    loaded."""
    if name is not None:
        raise ValueError(f"{directory}: a peft adapter (LoRA, DoRA or (IA)^3) does not stack; name= is for ReFT-family adapters")
    gpt = find_gpt2(model)
    methods, tensors = read_peft_adapter(directory, gpt)
    prefix = gpt_prefix(model, gpt)
    return install_adapter(model, gpt, methods, {prefix + key: t for key, t in tensors.items()}, directory,
                           {"version": ADAPTER_VERSION}, trainable)  # converted tensors are in the current layout


def save_peft_adapter(model: nn.Module, directory: str | Path, base_class: str = "GPT2LMHeadModel") -> Path:
    """Writes `model`'s LoRA, DoRA or (IA)^3 adapter in peft's format: adapter_config.json and
    adapter_model.safetensors with peft's keys for transformers' `base_class` (GPT2LMHeadModel or GPT2Model).
    Refuses a model that trains anything peft's file cannot hold (another method, a task head)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    gpt = find_gpt2(model)
    methods = applied_methods(gpt)
    if len(methods) != 1:
        applied = ", ".join(m.method for m in methods) or "no method"
        raise ValueError(f"peft's format holds one LoRA, DoRA or (IA)^3 adapter; this model has {applied}")
    prefix = gpt_prefix(model, gpt)
    tensors = {**adapter_parts(model, gpt), **trained_tensors(model)}
    outside = [key for key in tensors if not key.startswith(prefix)]
    if outside:
        raise ValueError(f"peft's format holds GPT-2's adapter tensors only; this model also trains {', '.join(outside[:4])} "
                         f"(its task head): save it with save_adapter(model, dir) in this project's format instead")
    config, peft_tensors = peft_adapter_files(gpt, methods[0], {k[len(prefix):]: t for k, t in tensors.items()}, base_class)
    atomic_save(lambda temp: save_file(peft_tensors, temp, metadata={"format": "pt"}), directory / PEFT_WEIGHTS)
    atomic_save(lambda temp: Path(temp).write_text(json.dumps(config, indent=2) + "\n"), directory / PEFT_CONFIG)
    return directory
