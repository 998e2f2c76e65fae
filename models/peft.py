"""Fine-tuning methods as configurations applied to a loaded GPT2Model, and adapter files.

    config = MethodConfig(method="loreft", rank=4, positions="f1+l1")
    apply_method(model.gpt, config)        # freezes the base, adds the trainable parts, in place
    ...train...
    save_adapter(model, "runs/sst-loreft/best")   # only the trained tensors + the config as JSON
    load_adapter(fresh_model, "runs/sst-loreft/best")

Task code never branches on the method: it builds its model, calls apply_method, and trains whatever
requires a gradient (the method's parts and the task head).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from models.gpt2 import GPT2Model
from data.atomic import atomic_save
from modules.lora import LORA_TARGETS, LoRAGPT2Layer
from modules.reft import ACTIVATIONS, COMPONENTS, PositionedIntervention, ReFTGPT2Layer, parse_positions

METHODS = ("full", "last-linear-layer", "bitfit", "layernorm", "lora", "reft", "loreft", "noreft", "direft")
REFT_FAMILY = ("reft", "loreft", "noreft", "direft")
# Which options each method takes, and their defaults. Anything else given for a method is an error.
METHOD_OPTIONS = {
    "full": {},
    "last-linear-layer": {},
    "bitfit": {"layers": None},
    "layernorm": {"layers": None},
    "lora": {"layers": None, "rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ("query", "value"), "rslora": False},
    "reft": {"layers": None, "rank": 8, "alpha": None, "dropout": 0.0, "components": ("attention", "ffn"),
             "positions": "all", "tie_positions": True, "activation": "relu", "name": "default"},
    **{method: {"layers": None, "rank": 4, "alpha": None, "dropout": 0.0, "components": ("ffn",),
                "positions": "f1+l1", "tie_positions": True, "activation": "identity", "name": "default"}
       for method in ("loreft", "noreft", "direft")},
}
# (orthogonal R, subtract the projection R h) for each member of the ReFT family.
REFT_FLAGS = {"reft": (False, False), "loreft": (True, True), "noreft": (False, True), "direft": (False, False)}
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
ADAPTER_FORMAT = "gpt2-peft-adapter"


@dataclass
class MethodConfig:
    """A fine-tuning method and its options; options left None take the method's defaults."""

    method: str = "full"
    layers: Optional[list[int]] = None  # None: every layer
    rank: Optional[int] = None
    alpha: Optional[float] = None  # LoRA: scale alpha/r; ReFT family: scale alpha/r, default alpha = r
    dropout: Optional[float] = None
    targets: Optional[tuple[str, ...]] = None  # LoRA: among query, key, value, attn_out, mlp_in, mlp_out
    rslora: Optional[bool] = None  # LoRA: rank-stabilised scale alpha/sqrt(r)
    components: Optional[tuple[str, ...]] = None  # ReFT: 'attention' and/or 'ffn' (the layer's output)
    positions: Optional[str] = None  # ReFT: 'all', or first/last prompt tokens like 'f1+l1'
    tie_positions: Optional[bool] = None  # ReFT: one intervention for all positions, or one per position
    activation: Optional[str] = None  # ReFT: identity, relu, gelu, tanh
    name: Optional[str] = None  # ReFT: adapter name, so that several adapters can share a model

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        options = METHOD_OPTIONS[self.method]
        for field in dataclasses.fields(self):
            if field.name == "method":
                continue
            value = getattr(self, field.name)
            if field.name not in options:
                if value is not None:
                    raise ValueError(f"option {field.name!r} does not apply to method {self.method!r}")
            elif value is None:
                setattr(self, field.name, options[field.name])
        if self.method in REFT_FAMILY and self.alpha is None:
            self.alpha = float(self.rank)
        self._validate()

    def _validate(self):
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.layers is not None:
            self.layers = sorted(set(int(i) for i in self.layers))
            if not self.layers:
                raise ValueError("layers must name at least one layer (or be None for all)")
        if self.targets is not None:
            self.targets = tuple(self.targets)
            unknown = [t for t in self.targets if t not in LORA_TARGETS]
            if unknown or not self.targets:
                raise ValueError(f"LoRA targets must be among {', '.join(LORA_TARGETS)}; got {list(self.targets)}")
        if self.components is not None:
            self.components = tuple(self.components)
            if not self.components or any(c not in COMPONENTS for c in self.components):
                raise ValueError(f"ReFT components must be among {', '.join(COMPONENTS)}; got {list(self.components)}")
        if self.positions is not None:
            parse_positions(self.positions)
        if self.activation is not None and self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")

    def to_dict(self) -> dict:
        """Only the options that apply to the method, JSON-ready."""
        out = {"method": self.method}
        for name in METHOD_OPTIONS[self.method]:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> "MethodConfig":
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise ValueError(f"unknown method options {unknown}")
        return cls(**raw)


# ---------------------------------------------------------------------------------------- applying
def apply_method(gpt: GPT2Model, config: MethodConfig) -> GPT2Model:
    """Applies a method to `gpt` in place and records it in `gpt.peft_methods`. Every method but 'full'
    freezes the base model first; the method's own parts are then the only trainable GPT-2 parameters."""
    if not isinstance(gpt, GPT2Model):
        raise TypeError(f"apply_method expects a GPT2Model, got {type(gpt).__name__}")
    applied = applied_methods(gpt)
    if applied and not (config.method in REFT_FAMILY and all(m.method in REFT_FAMILY for m in applied)):
        raise ValueError(
            f"this model already has {', '.join(m.method for m in applied)} applied; only ReFT-family adapters can "
            f"be combined, so {config.method!r} cannot be added (start from a freshly loaded base model)"
        )
    if config.method in REFT_FAMILY and any(m.name == config.name for m in applied):
        raise ValueError(f"an adapter named {config.name!r} is already applied; give the new one another name")
    layers = resolve_layers(config.layers, gpt.config.n_layer)
    if config.method != "full":
        gpt.requires_grad_(False)
    if config.method in ("bitfit", "layernorm"):  # cheap baselines: every bias, or every LayerNorm's gain and bias
        chosen = [gpt.h[index] for index in layers] + ([gpt.ln_f] if config.layers is None else [])
        for module in (sub for part in chosen for sub in part.modules()):
            for name, param in module.named_parameters(recurse=False):
                param.requires_grad_(name == "bias" if config.method == "bitfit" else isinstance(module, nn.LayerNorm))
    elif config.method == "lora":
        for index in layers:
            gpt.h[index] = LoRAGPT2Layer(gpt.h[index], config.targets, config.rank, config.alpha, config.dropout,
                                         rank_stabilized=config.rslora)
    elif config.method in REFT_FAMILY:
        orthogonal, subtract = REFT_FLAGS[config.method]
        for index in layers:
            if not isinstance(gpt.h[index], ReFTGPT2Layer):
                gpt.h[index] = ReFTGPT2Layer(gpt.h[index])
            for component in config.components:
                gpt.h[index].add(component, config.name, PositionedIntervention(
                    gpt.config.n_embd, config.rank, config.positions, config.tie_positions,
                    orthogonal=orthogonal, subtract_projection=subtract, activation=config.activation,
                    dropout=config.dropout, scale=config.alpha / config.rank,
                ))
    gpt.peft_methods = applied + [config]
    # New parts are created in fp32 on the CPU: follow the model's device, and re-apply its precision
    # so that nothing frozen is left in fp32.
    # New parts are created in train mode: follow the model's mode too.
    gpt.to(gpt.wte.weight.device).train(gpt.training)
    return gpt.set_precision(gpt.precision)


def applied_methods(gpt: GPT2Model) -> list[MethodConfig]:
    return list(getattr(gpt, "peft_methods", []))


def resolve_layers(layers: Optional[list[int]], n_layer: int) -> list[int]:
    if layers is None:
        return list(range(n_layer))
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"layers {bad} do not exist: this model has layers 0..{n_layer - 1}")
    return list(layers)


def set_lora_merged(gpt: GPT2Model, merged: bool) -> None:
    """Merges every LoRA update into its weight (inference at base-model cost), or undoes it."""
    for layer in gpt.h:
        if isinstance(layer, LoRAGPT2Layer):
            layer.merge() if merged else layer.unmerge()


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
    c = gpt.config
    return {"vocab_size": c.vocab_size, "n_positions": c.n_positions, "n_embd": c.n_embd, "n_layer": c.n_layer,
            "n_head": c.n_head}


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Saves the trainable tensors of `model` (the method's parts and any task head) to adapter.safetensors
    and the applied methods with the base model's shape to adapter_config.json. Returns the directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    gpt = find_gpt2(model)
    tensors = trained_tensors(model)
    atomic_save(lambda temp: save_file(tensors, temp, metadata={"format": ADAPTER_FORMAT}), directory / ADAPTER_WEIGHTS)
    config = {
        "format": ADAPTER_FORMAT,
        "version": 1,
        "methods": [m.to_dict() for m in applied_methods(gpt)] or [MethodConfig("full").to_dict()],
        "base": base_shape(gpt),
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
    return config


def load_adapter(model: nn.Module, directory: str | Path, name: Optional[str] = None) -> nn.Module:
    """Loads an adapter saved by save_adapter into `model` (built on a freshly loaded base of the same
    shape): applies the recorded methods unless already applied, then copies every saved tensor.
    `name` renames a ReFT adapter, so that two adapters saved under the same name can be combined."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    config = read_adapter_config(directory)
    gpt = find_gpt2(model)
    saved_shape, shape = config["base"], base_shape(gpt)
    different = {k: (v, shape.get(k)) for k, v in saved_shape.items() if shape.get(k) != v}
    if different:
        details = ", ".join(f"{k} {saved} vs {ours}" for k, (saved, ours) in different.items())
        raise ValueError(f"{directory}: adapter was trained on a base model of another shape (adapter vs this model: {details})")
    methods = [MethodConfig.from_dict(m) for m in config["methods"]]
    renames = {}
    if name is not None:
        if len(methods) != 1 or methods[0].method not in REFT_FAMILY:
            raise ValueError(f"{directory}: only a single ReFT-family adapter can be loaded under a new name")
        renames[methods[0].name] = name
        methods[0].name = name
    try:
        tensors = load_file(directory / ADAPTER_WEIGHTS)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: cannot read the adapter weights ({error})") from None
    tensors = {rename_adapter_key(k, renames): t for k, t in tensors.items()}
    applied = [m.to_dict() for m in applied_methods(gpt)]
    missing_methods = [m for m in methods if m.to_dict() not in applied]
    # Every check runs before the model changes, so a file that does not fit leaves the model as it was.
    shapes = parameter_shapes_after(model, gpt, missing_methods)
    unknown = sorted(k for k in tensors if k not in shapes)
    wrong = sorted(k for k in tensors if k in shapes and shapes[k] != tensors[k].shape)
    if unknown or wrong:
        raise ValueError(
            f"{directory}: adapter does not fit this model"
            + (f"; tensors the model does not have: {', '.join(unknown[:8])}" if unknown else "")
            + (f"; tensors of another shape: {', '.join(wrong[:8])}" if wrong else "")
        )
    for method in missing_methods:
        apply_method(gpt, method)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            params[key].copy_(tensor)
    return model


def parameter_shapes_after(model: nn.Module, gpt: GPT2Model, methods: list[MethodConfig]) -> dict[str, torch.Size]:
    """The parameter names and shapes `model` would have once `methods` are applied to its `gpt`, found on a
    skeleton of the same shape on the meta device (no memory, no change to the model)."""
    with torch.device("meta"):
        skeleton = GPT2Model(gpt.config)
    for method in applied_methods(gpt) + methods:
        apply_method(skeleton, method)
    prefix = next(name for name, module in model.named_modules() if module is gpt)
    prefix = prefix + "." if prefix else ""
    shapes = {name: p.shape for name, p in model.named_parameters() if not name.startswith(prefix)} if prefix else {}
    shapes.update({prefix + name: p.shape for name, p in skeleton.named_parameters()})
    return shapes


def rename_adapter_key(key: str, renames: dict[str, str]) -> str:
    parts = key.split(".")
    for i in range(len(parts) - 2):
        if parts[i] == "interventions" and parts[i + 1] in COMPONENTS and parts[i + 2] in renames:
            parts[i + 2] = renames[parts[i + 2]]
    return ".".join(parts)


# ---------------------------------------------------------------------------------------- command line
def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fine-tuning method")
    group.add_argument("--method", default="full", choices=METHODS, help="what to train (default: full)")
    group.add_argument("--layers", default=None, help="comma-separated layer indices to adapt (default: all)")
    group.add_argument("--rank", type=int, default=None, help="LoRA / ReFT rank (default 8 for lora and reft, 4 for loreft/noreft/direft)")
    group.add_argument("--alpha", type=float, default=None, help="scale numerator: updates are scaled by alpha/rank")
    group.add_argument("--method-dropout", type=float, default=None, help="dropout inside the LoRA / ReFT path")
    group.add_argument("--lora-targets", default=None, help=f"comma-separated, among {', '.join(LORA_TARGETS)} (default query,value)")
    group.add_argument("--rslora", action="store_true", default=None, help="LoRA: rank-stabilised scale alpha/sqrt(rank)")
    group.add_argument("--reft-components", default=None, help="ReFT: attention and/or ffn, comma-separated")
    group.add_argument("--positions", default=None, help="ReFT: 'all' or first/last prompt tokens such as f1+l1")
    group.add_argument("--untie-positions", action="store_true", default=None, help="ReFT: one intervention per position")
    group.add_argument("--activation", default=None, choices=list(ACTIVATIONS), help="ReFT: activation inside the intervention")


def method_config_from_args(args: argparse.Namespace, parser: Optional[argparse.ArgumentParser] = None) -> MethodConfig:
    """Builds the MethodConfig from add_method_arguments' flags; a bad combination is a command-line error."""
    def split(value, convert=str):
        return None if value is None else [convert(v.strip()) for v in value.split(",") if v.strip()]

    try:
        try:
            layers = split(args.layers, int)
        except ValueError:
            raise ValueError(f"--layers must be comma-separated layer indices such as 0,5,11; got {args.layers!r}") from None
        return MethodConfig(
            method=args.method,
            layers=layers,
            rank=args.rank,
            alpha=args.alpha,
            dropout=args.method_dropout,
            targets=split(args.lora_targets),
            rslora=args.rslora,
            components=split(args.reft_components),
            positions=args.positions,
            tie_positions=None if args.untie_positions is None else not args.untie_positions,
            activation=args.activation,
        )
    except ValueError as error:
        message = str(error)
        for option, flag in (("targets", "--lora-targets"), ("components", "--reft-components"),
                             ("tie_positions", "--untie-positions"), ("dropout", "--method-dropout"),
                             ("positions", "--positions"), ("rank", "--rank"), ("alpha", "--alpha"),
                             ("activation", "--activation"), ("layers", "--layers"), ("rslora", "--rslora")):
            message = re.sub(rf"(option '{option}'|^{option}\b)", flag, message)
        if parser is not None:
            parser.error(message)
        raise ValueError(message) from None
