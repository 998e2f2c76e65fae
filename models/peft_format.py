"""peft's adapter format for LoRA and DoRA on GPT-2, converted to and from this project's methods.

A peft adapter directory holds `adapter_config.json` (with `peft_type`) and `adapter_model.safetensors` (or an
older `adapter_model.bin`), keys as peft writes them for transformers' `GPT2LMHeadModel`
(`base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight`, `...lora_B.weight`, DoRA's
`...lora_magnitude_vector`) or `GPT2Model` (`base_model.model.h.{i}...`). GPT-2's four matrices are Conv1D
(in, out), which peft adapts with `fan_in_fan_out=True` (it turns the flag on itself for Conv1D), but lora_A is
(r, in) and lora_B (out, r) either way: exactly our A and B, so the tensors copy as they are.

peft module -> our target: attn.c_attn -> c_attn, attn.c_proj -> attn_out, mlp.c_fc -> mlp_in, mlp.c_proj ->
mlp_out. Our per-projection query/key/value targets are written as one c_attn update whose A stacks theirs and
whose B is block-diagonal on their rows, with rank and alpha scaled so that peft's scale is ours (through
rank_pattern / alpha_pattern when other targets keep the plain rank). Pure conversion: models/peft.py reads and
writes the files and installs the tensors.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import torch

from models.gpt2 import GPT2Model
from models.methods import MethodConfig
from modules.lora import LORA_TARGETS

PEFT_CONFIG, PEFT_WEIGHTS, PEFT_WEIGHTS_BIN = "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"
PEFT_METHODS = ("lora", "dora")
MODULE_TARGETS = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}
TARGET_MODULES = {target: module for module, target in MODULE_TARGETS.items()}
QKV = ("query", "key", "value")
# transformers class -> where its GPT-2 blocks live inside the peft model
BASE_PREFIXES = {"GPT2LMHeadModel": "base_model.model.transformer.", "GPT2Model": "base_model.model."}
KEY = re.compile(r"base_model\.model\.(?P<transformer>transformer\.)?h\.(?P<layer>\d+)\."
                 r"(?P<module>attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\."
                 r"(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector)")
OUR_NAMES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude"}


def read_peft_config(directory: Path) -> Optional[dict]:
    """The directory's adapter_config.json when it is peft's (it has `peft_type`), else None."""
    path = Path(directory) / PEFT_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # not readable as peft's: the project's own reader says what is wrong with it
    return config if isinstance(config, dict) and "peft_type" in config else None


def is_peft_adapter(directory: str | Path) -> bool:
    return read_peft_config(Path(directory)) is not None


def peft_weights_path(directory: Path) -> Path:
    for name in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: a peft adapter config, but neither {PEFT_WEIGHTS} nor {PEFT_WEIGHTS_BIN}")


# ---------------------------------------------------------------------------------------------- reading
def unsupported_settings(config: dict) -> list[str]:
    """The peft settings this project's LoRA cannot represent, as 'name=value'."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type={config.get('peft_type')!r} (only LORA converts, with use_dora for DoRA)")
    checks = {
        "r": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "lora_alpha": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bias": lambda v: v in (None, "none"),  # peft trains biases otherwise, which this LoRA does not hold
        "modules_to_save": lambda v: not v,
        "rank_pattern": lambda v: isinstance(v, dict) or not v,  # checked per module once the tensors are read
        "alpha_pattern": lambda v: isinstance(v, dict) or not v,
        "layer_replication": lambda v: not v,
        "use_dora": lambda v: isinstance(v, bool) or v is None,
        "use_rslora": lambda v: isinstance(v, bool) or v is None,
    }
    for name, fine in checks.items():
        if not fine(config.get(name)):
            problems.append(f"{name}={json.dumps(config.get(name))}")
    return problems


def matches_target_modules(config: dict, module_name: str) -> bool:
    """peft's rule: a regex string must match the whole module name; a list entry must equal it or end it after
    a dot."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets or ())


def module_rank_and_alpha(config: dict, module_name: str) -> tuple[int, float]:
    """peft's rank and alpha for one module: the first rank_pattern / alpha_pattern key that ends its name."""
    patterns = list((config.get("rank_pattern") or {})) + list((config.get("alpha_pattern") or {}))
    key = next((k for k in patterns if re.match(rf".*\.{k}$", module_name)), module_name)
    return (int((config.get("rank_pattern") or {}).get(key, config["r"])),
            float((config.get("alpha_pattern") or {}).get(key, config["lora_alpha"])))


def read_peft_adapter(directory: str | Path, gpt: GPT2Model) -> tuple[list[MethodConfig], dict[str, torch.Tensor]]:
    """A peft LoRA/DoRA adapter as (the equivalent method, its tensors by parameter name inside `gpt`).
    Refuses, naming the file and the setting, what cannot convert."""
    directory = Path(directory)
    config = read_peft_config(directory)
    config_path = directory / PEFT_CONFIG
    problems = unsupported_settings(config)
    if problems:
        raise ValueError(f"{config_path}: peft adapter settings this project cannot convert: {'; '.join(problems)}")
    tensors = read_peft_tensors(peft_weights_path(directory))
    dora = bool(config.get("use_dora"))
    found: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    prefixes, ranks = set(), set()
    for key, tensor in tensors.items():
        match = KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{directory}: peft tensor {key} is not a LoRA tensor of a GPT-2 block's c_attn, "
                             "attn.c_proj, mlp.c_fc or mlp.c_proj, the projections this project adapts")
        if match["kind"] == "lora_magnitude_vector" and not dora:
            raise ValueError(f"{directory}: {key} is a DoRA magnitude, but the config says use_dora=false")
        prefixes.add(bool(match["transformer"]))
        module_name = f"{'transformer.' if match['transformer'] else ''}h.{match['layer']}.{match['module']}"
        if not matches_target_modules(config, module_name):
            raise ValueError(f"{directory}: {key} adapts {module_name}, which target_modules="
                             f"{json.dumps(config.get('target_modules'))} does not name")
        ranks.add(module_rank_and_alpha(config, module_name))
        target = MODULE_TARGETS[match["module"]]
        found.setdefault(int(match["layer"]), {}).setdefault(target, {})[OUR_NAMES[match["kind"]]] = tensor
    if not found:
        raise ValueError(f"{directory}: the peft adapter holds no LoRA tensors")
    if len(ranks) > 1:
        raise ValueError(f"{config_path}: rank_pattern / alpha_pattern give the adapted modules different ranks or "
                         f"alphas ({', '.join(f'r={r} alpha={a:g}' for r, a in sorted(ranks))}); this project's LoRA "
                         "uses one rank and alpha for every target")
    if len(prefixes) > 1:
        raise ValueError(f"{directory}: keys of both GPT2LMHeadModel (transformer.h...) and GPT2Model (h...) layouts")
    layers = sorted(found)
    beyond = [i for i in layers if i >= gpt.config.n_layer]
    if beyond:
        raise ValueError(f"{directory}: the peft adapter adapts layers {beyond}; this model has layers "
                         f"0..{gpt.config.n_layer - 1}")
    targets = sorted(found[layers[0]], key=list(LORA_TARGETS).index)
    for layer in layers:
        if sorted(found[layer], key=list(LORA_TARGETS).index) != targets:
            raise ValueError(f"{directory}: the peft adapter adapts {', '.join(found[layer])} in layer {layer} but "
                             f"{', '.join(targets)} in layer {layers[0]}; this project's LoRA applies one set of "
                             "targets to every adapted layer")
        for target, parts in found[layer].items():
            needed = {"A", "B"} | ({"magnitude"} if dora else set())
            if set(parts) != needed:
                missing = sorted(needed - set(parts))
                raise ValueError(f"{directory}: layer {layer} {TARGET_MODULES[target]} lacks "
                                 f"{', '.join(missing)} (peft's lora_A / lora_B / lora_magnitude_vector)")
    (rank, alpha), = ranks
    method = MethodConfig(
        "dora" if dora else "lora", rank=rank, alpha=alpha,
        dropout=float(config.get("lora_dropout") or 0.0), targets=tuple(targets), rslora=bool(config.get("use_rslora")),
        layers=None if layers == list(range(gpt.config.n_layer)) else layers,
    )
    ours = {f"h.{layer}.lora.{target}.{name}": tensor.float()
            for layer, by_target in found.items() for target, parts in by_target.items() for name, tensor in parts.items()}
    return [method], ours


def read_peft_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: cannot read the peft adapter weights ({error})") from None
    from models.loading import load_torch_file

    state = load_torch_file(path)  # weights_only: a pickle that needs more than tensors is refused
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    return state


# ---------------------------------------------------------------------------------------------- writing
def peft_adapter_files(gpt: GPT2Model, method: MethodConfig, tensors: dict[str, torch.Tensor],
                       base_class: str = "GPT2LMHeadModel", base_model_name_or_path: Optional[str] = None,
                       ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json's content, adapter_model.safetensors' tensors) for `method` applied to `gpt`, whose
    trained tensors (by parameter name inside gpt) are `tensors`: what peft loads onto transformers'
    `base_class` with the same base weights to the same outputs."""
    if method.method not in PEFT_METHODS:
        raise ValueError(f"peft's LoRA format holds lora and dora adapters; this model has {method.method}")
    if base_class not in BASE_PREFIXES:
        raise ValueError(f"base_class must be one of {', '.join(BASE_PREFIXES)}, got {base_class!r}")
    prefix, dora = BASE_PREFIXES[base_class], method.method == "dora"
    layers = list(range(gpt.config.n_layer)) if method.layers is None else list(method.layers)
    fused = [t for t in QKV if t in method.targets]  # written as one c_attn update of rank len(fused) x r
    # peft's scale is alpha / r (or alpha / sqrt(r)): c_attn's rank k r needs alpha k (or alpha sqrt(k)) to keep ours
    fused_alpha = method.alpha * (math.sqrt(len(fused)) if method.rslora else len(fused))
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        block = f"{prefix}h.{layer}."
        for target in method.targets:
            if target in QKV:
                continue
            parts = {name: tensors[f"h.{layer}.lora.{target}.{name}"] for name in ("A", "B")}
            if dora:
                parts["magnitude"] = tensors[f"h.{layer}.lora.{target}.magnitude"]
            write_parts(out, block + TARGET_MODULES[target], parts)
        if fused:
            write_parts(out, block + "attn.c_attn", fused_qkv(gpt, layer, method, tensors, fused))
    modules = sorted({TARGET_MODULES.get(t, "attn.c_attn") for t in method.targets})
    whole = layers == list(range(gpt.config.n_layer))
    others = [t for t in method.targets if t not in QKV]
    rank, alpha = method.rank, method.alpha
    rank_pattern, alpha_pattern = {}, {}
    if fused and not others:
        rank, alpha = len(fused) * method.rank, fused_alpha
    elif len(fused) > 1:
        rank_pattern, alpha_pattern = {"attn.c_attn": len(fused) * method.rank}, {"attn.c_attn": fused_alpha}
    config = {
        "alpha_pattern": alpha_pattern,
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": True,  # GPT-2's Conv1D weights are (in, out)
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": method.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": rank_pattern,
        "revision": None,
        # All layers: module names, as peft's own configs give them; some layers: one regex over the full names.
        "target_modules": modules if whole else
        rf"(.*\.)?h\.({'|'.join(map(str, layers))})\.({'|'.join(re.escape(m) for m in modules)})",
        "task_type": "CAUSAL_LM" if base_class == "GPT2LMHeadModel" else None,
        "use_dora": dora,
        "use_rslora": method.rslora,
    }
    return config, out


def write_parts(out: dict, module: str, parts: dict[str, torch.Tensor]) -> None:
    out[f"{module}.lora_A.weight"] = parts["A"].float().contiguous()
    out[f"{module}.lora_B.weight"] = parts["B"].float().contiguous()
    if "magnitude" in parts:
        out[f"{module}.lora_magnitude_vector"] = parts["magnitude"].float().contiguous()


def fused_qkv(gpt: GPT2Model, layer: int, method: MethodConfig, tensors: dict, fused: list[str]) -> dict:
    """Per-projection query/key/value updates as one update of the fused c_attn: A stacks their A's, B puts each
    B on its own rows and columns, so B A is theirs on their rows and zero elsewhere. DoRA's magnitudes of the
    rows no update touches are ||W|| there, which peft's rescaling leaves as they are (m / ||W|| = 1)."""
    weight = unmerged_weight(gpt.h[layer].layer.attn.c_attn)
    d, r = gpt.config.n_embd, method.rank
    a = torch.cat([tensors[f"h.{layer}.lora.{t}.A"].float() for t in fused])
    b = torch.zeros(3 * d, len(fused) * r)
    magnitude = torch.linalg.norm(weight, dim=1)
    for column, target in enumerate(fused):
        rows = slice(QKV.index(target) * d, (QKV.index(target) + 1) * d)
        b[rows, column * r:(column + 1) * r] = tensors[f"h.{layer}.lora.{target}.B"].float()
        if method.method == "dora":
            magnitude[rows] = tensors[f"h.{layer}.lora.{target}.magnitude"].float()
    parts = {"A": a, "B": b}
    if method.method == "dora":
        parts["magnitude"] = magnitude
    return parts


def unmerged_weight(linear) -> torch.Tensor:
    if getattr(linear, "merged", False):
        raise ValueError("the LoRA/DoRA updates are merged into the weights; unmerge them (set_lora_merged(model, "
                         "False)) before saving in peft's format")
    return linear.weight.detach().float().cpu()
