"""peft's adapter format for LoRA, DoRA and (IA)^3 on GPT-2, converted to and from this project's methods.

A peft adapter directory holds `adapter_config.json` (with `peft_type`) and `adapter_model.safetensors` (or an
older `adapter_model.bin`), keys as peft writes them for transformers' `GPT2LMHeadModel`
(`base_model.model.transformer.h.{i}.attn.c_attn.lora_A.weight`, `...lora_B.weight`, DoRA's
`...lora_magnitude_vector`) or `GPT2Model` (`base_model.model.h.{i}...`). GPT-2's four matrices are Conv1D
(in, out), which peft adapts with `fan_in_fan_out=True` (it turns the flag on itself for Conv1D), but lora_A is
(r, in) and lora_B (out, r) either way: exactly our A and B, so the tensors copy as they are.

peft module -> our target: attn.c_attn -> c_attn, attn.c_proj -> attn_out, mlp.c_fc -> mlp_in, mlp.c_proj ->
mlp_out. Our per-projection query/key/value targets are written as one c_attn update whose A stacks theirs and
whose B is block-diagonal on their rows, with rank and alpha scaled so that peft's scale is ours (through
rank_pattern / alpha_pattern when other targets keep the plain rank). (IA)^3 (`ia3_l`): peft's c_attn output
vector is our `c_attn` target (our key/value vectors are written into it with ones on the other thirds), and
its feed-forward mlp.c_proj input vector our `ffn`. Pure conversion: models/peft.py reads and
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
PEFT_METHODS = ("lora", "dora", "ia3")
MODULE_TARGETS = {"attn.c_attn": "c_attn", "attn.c_proj": "attn_out", "mlp.c_fc": "mlp_in", "mlp.c_proj": "mlp_out"}
TARGET_MODULES = {target: module for module, target in MODULE_TARGETS.items()}
QKV = ("query", "key", "value")
# transformers class -> where its GPT-2 blocks live inside the peft model
BASE_PREFIXES = {"GPT2LMHeadModel": "base_model.model.transformer.", "GPT2Model": "base_model.model."}
KEY = re.compile(r"base_model\.model\.(?P<transformer>transformer\.)?h\.(?P<layer>\d+)\."
                 r"(?P<module>attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\."
                 r"(?P<kind>lora_A\.weight|lora_B\.weight|lora_magnitude_vector|ia3_l)")
OUR_NAMES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude", "ia3_l": "scale"}


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
        problems.append(f"peft_type={config.get('peft_type')!r} (LORA, with use_dora for DoRA, and IA3 convert)")
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


def matches_target_modules(targets, module_name: str, suffix_only: bool = False) -> bool:
    """peft's rule: a regex string must match the whole module name; a list entry must equal it or end it after
    a dot (for IA3's feedforward_modules, end it: `suffix_only`)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    if suffix_only:
        return any(module_name.endswith(t) for t in targets or ())
    return any(module_name == t or module_name.endswith("." + t) for t in targets or ())


def module_rank_and_alpha(config: dict, module_name: str) -> tuple[int, float]:
    """peft's rank and alpha for one module: the first rank_pattern / alpha_pattern key that ends its name."""
    patterns = list((config.get("rank_pattern") or {})) + list((config.get("alpha_pattern") or {}))
    key = next((k for k in patterns if re.match(rf".*\.{k}$", module_name)), module_name)
    return (int((config.get("rank_pattern") or {}).get(key, config["r"])),
            float((config.get("alpha_pattern") or {}).get(key, config["lora_alpha"])))


def read_peft_adapter(directory: str | Path, gpt: GPT2Model) -> tuple[list[MethodConfig], dict[str, torch.Tensor]]:
    """A peft LoRA, DoRA or (IA)^3 adapter as (the equivalent method, its tensors by parameter name inside `gpt`).
    Refuses, naming the file and the setting, what cannot convert."""
    directory = Path(directory)
    config = read_peft_config(directory)
    if config.get("peft_type") == "IA3":
        return read_ia3(directory, config, gpt)
    problems = unsupported_settings(config)
    if problems:
        raise ValueError(f"{directory / PEFT_CONFIG}: peft adapter settings this project cannot convert: "
                         f"{'; '.join(problems)}")
    return read_lora(directory, config, gpt)


def parse_keys(tensors: dict, config: dict, directory: Path, target_of) -> dict[int, dict[str, dict]]:
    """peft's keys -> {layer: {our target: {our tensor name: tensor}}}. `target_of(module, module_name, kind)`
    gives our target of one adapted module, or raises saying why there is none."""
    found: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    prefixes = set()
    for key, tensor in tensors.items():
        match = KEY.fullmatch(key)
        if match is None:
            raise ValueError(f"{directory}: peft tensor {key} is not a tensor of a GPT-2 block's c_attn, attn.c_proj, "
                             "mlp.c_fc or mlp.c_proj, the projections this project adapts")
        prefixes.add(bool(match["transformer"]))
        module_name = f"{'transformer.' if match['transformer'] else ''}h.{match['layer']}.{match['module']}"
        if not matches_target_modules(config.get("target_modules"), module_name):
            raise ValueError(f"{directory}: {key} adapts {module_name}, which target_modules="
                             f"{json.dumps(config.get('target_modules'))} does not name")
        target = target_of(match["module"], module_name, match["kind"])
        found.setdefault(int(match["layer"]), {}).setdefault(target, {})[OUR_NAMES[match["kind"]]] = tensor
    if not found:
        raise ValueError(f"{directory}: the peft adapter holds no tensors")
    if len(prefixes) > 1:
        raise ValueError(f"{directory}: keys of both GPT2LMHeadModel (transformer.h...) and GPT2Model (h...) layouts")
    return found


def adapted_layers(found: dict, gpt: GPT2Model, directory: Path, order: list[str]) -> tuple[Optional[list[int]], list[str]]:
    """(the layers option: None for all of them, the targets), once every adapted layer has the same targets."""
    layers = sorted(found)
    beyond = [i for i in layers if i >= gpt.config.n_layer]
    if beyond:
        raise ValueError(f"{directory}: the peft adapter adapts layers {beyond}; this model has layers "
                         f"0..{gpt.config.n_layer - 1}")
    targets = sorted(found[layers[0]], key=order.index)
    for layer in layers:
        if sorted(found[layer], key=order.index) != targets:
            raise ValueError(f"{directory}: the peft adapter adapts {', '.join(found[layer])} in layer {layer} but "
                             f"{', '.join(targets)} in layer {layers[0]}; this project's methods apply one set of "
                             "targets to every adapted layer")
    return (None if layers == list(range(gpt.config.n_layer)) else layers), targets


def read_lora(directory: Path, config: dict, gpt: GPT2Model) -> tuple[list[MethodConfig], dict[str, torch.Tensor]]:
    dora, ranks = bool(config.get("use_dora")), set()

    def target_of(module: str, module_name: str, kind: str) -> str:
        if kind == "ia3_l":
            raise ValueError(f"{directory}: an (IA)^3 vector in a {config.get('peft_type')} adapter")
        if kind == "lora_magnitude_vector" and not dora:
            raise ValueError(f"{directory}: {module_name} has a DoRA magnitude, but the config says use_dora=false")
        ranks.add(module_rank_and_alpha(config, module_name))
        return MODULE_TARGETS[module]

    found = parse_keys(read_peft_tensors(peft_weights_path(directory)), config, directory, target_of)
    if len(ranks) > 1:
        raise ValueError(f"{directory / PEFT_CONFIG}: rank_pattern / alpha_pattern give the adapted modules different "
                         f"ranks or alphas ({', '.join(f'r={r} alpha={a:g}' for r, a in sorted(ranks))}); this "
                         "project's LoRA uses one rank and alpha for every target")
    layers, targets = adapted_layers(found, gpt, directory, list(LORA_TARGETS))
    needed = {"A", "B"} | ({"magnitude"} if dora else set())
    for layer, by_target in found.items():
        for target, parts in by_target.items():
            if set(parts) != needed:
                raise ValueError(f"{directory}: layer {layer} {TARGET_MODULES[target]} lacks "
                                 f"{', '.join(sorted(needed - set(parts)))} (peft's lora_A / lora_B / lora_magnitude_vector)")
    (rank, alpha), = ranks
    method = MethodConfig("dora" if dora else "lora", rank=rank, alpha=alpha, targets=tuple(targets), layers=layers,
                          dropout=float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora")))
    ours = {f"h.{layer}.lora.{target}.{name}": tensor.float()
            for layer, by_target in found.items() for target, parts in by_target.items() for name, tensor in parts.items()}
    return [method], ours


# peft's (IA)^3 modules on GPT-2 -> our targets: the fused c_attn output, and the input of mlp.c_proj (a
# feed-forward module in peft's terms), which is the FFN's inner activation.
IA3_MODULES = {("attn.c_attn", False): "c_attn", ("mlp.c_proj", True): "ffn"}


def read_ia3(directory: Path, config: dict, gpt: GPT2Model) -> tuple[list[MethodConfig], dict[str, torch.Tensor]]:
    if config.get("modules_to_save"):
        raise ValueError(f"{directory / PEFT_CONFIG}: peft adapter settings this project cannot convert: "
                         f"modules_to_save={json.dumps(config['modules_to_save'])}")

    def target_of(module: str, module_name: str, kind: str) -> str:
        if kind != "ia3_l":
            raise ValueError(f"{directory}: a LoRA tensor of {module_name} in an IA3 adapter")
        feedforward = matches_target_modules(config.get("feedforward_modules"), module_name, suffix_only=True)
        target = IA3_MODULES.get((module, feedforward))
        if target is None:
            raise ValueError(f"{directory}: (IA)^3 scaling the {'input' if feedforward else 'output'} of {module_name} "
                             "has no counterpart here: this project's (IA)^3 scales c_attn's output and the input of "
                             "mlp.c_proj (the FFN's inner activation)")
        return target

    found = parse_keys(read_peft_tensors(peft_weights_path(directory)), config, directory, target_of)
    layers, targets = adapted_layers(found, gpt, directory, ["c_attn", "ffn"])
    method = MethodConfig("ia3", ia3_targets=tuple(targets), layers=layers)
    ours = {f"h.{layer}.ia3.{target}.scale": parts["scale"].float().flatten()
            for layer, by_target in found.items() for target, parts in by_target.items()}
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
        raise ValueError(f"peft's format holds lora, dora and ia3 adapters here; this model has {method.method}")
    if base_class not in BASE_PREFIXES:
        raise ValueError(f"base_class must be one of {', '.join(BASE_PREFIXES)}, got {base_class!r}")
    prefix = BASE_PREFIXES[base_class]
    layers = list(range(gpt.config.n_layer)) if method.layers is None else list(method.layers)
    shared = {"auto_mapping": None, "base_model_name_or_path": base_model_name_or_path, "fan_in_fan_out": True,
              "inference_mode": True, "modules_to_save": None, "revision": None,
              "task_type": "CAUSAL_LM" if base_class == "GPT2LMHeadModel" else None}
    if method.method == "ia3":
        return ia3_adapter_files(gpt, method, tensors, prefix, layers, shared)
    dora = method.method == "dora"
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
    others = [t for t in method.targets if t not in QKV]
    rank, alpha = method.rank, method.alpha
    rank_pattern, alpha_pattern = {}, {}
    if fused and not others:
        rank, alpha = len(fused) * method.rank, fused_alpha
    elif len(fused) > 1:
        rank_pattern, alpha_pattern = {"attn.c_attn": len(fused) * method.rank}, {"attn.c_attn": fused_alpha}
    config = {
        **shared,  # fan_in_fan_out: GPT-2's Conv1D weights are (in, out)
        "alpha_pattern": alpha_pattern,
        "bias": "none",
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_dropout": method.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": rank_pattern,
        "target_modules": target_modules(modules, layers, gpt),
        "use_dora": dora,
        "use_rslora": method.rslora,
    }
    return config, out


def target_modules(modules: list[str], layers: list[int], gpt: GPT2Model):
    """All layers: the module names, as peft's own configs give them; some layers: one regex over the full names."""
    if layers == list(range(gpt.config.n_layer)):
        return modules
    return rf"(.*\.)?h\.({'|'.join(map(str, layers))})\.({'|'.join(re.escape(m) for m in modules)})"


def ia3_adapter_files(gpt: GPT2Model, method: MethodConfig, tensors: dict, prefix: str, layers: list[int],
                      shared: dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(IA)^3 in peft's layout: one (3d, 1) vector on c_attn's output (our query/key/value vectors on their thirds,
    ones on the thirds not targeted: the same computation), one (1, 4d) vector on mlp.c_proj's input."""
    d = gpt.config.n_embd
    out = {}
    for layer in layers:
        vectors = {t: tensors[f"h.{layer}.ia3.{t}.scale"].float() for t in method.ia3_targets}
        if "c_attn" in vectors or set(vectors) & set(QKV):
            scale = vectors.get("c_attn")
            if scale is None:
                scale = torch.cat([vectors.get(t, torch.ones(d)) for t in QKV])
            out[f"{prefix}h.{layer}.attn.c_attn.ia3_l"] = scale.reshape(3 * d, 1).contiguous()
        if "ffn" in vectors:
            out[f"{prefix}h.{layer}.mlp.c_proj.ia3_l"] = vectors["ffn"].reshape(1, 4 * d).contiguous()
    modules = [m for m, wanted in (("attn.c_attn", {"c_attn", *QKV}), ("mlp.c_proj", {"ffn"}))
               if wanted & set(method.ia3_targets)]
    config = {**shared, "feedforward_modules": ["mlp.c_proj"] if "ffn" in method.ia3_targets else [],
              "init_ia3_weights": True, "peft_type": "IA3", "target_modules": target_modules(modules, layers, gpt)}
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
