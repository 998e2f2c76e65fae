"""Every fine-tuning method, declared once: its options and defaults, its learning rate, and how it is applied.

    from models.methods import MethodConfig, get_method, method_names
    get_method("loreft").options   # {'layers': None, 'rank': 4, ...}

Each method's computation lives in its module under modules/ (modules/lora.py, modules/reft.py); an entry here
only says how to put it into a GPT2Model. To add a method: define any new option (`define_option`), then
`register_method(Method(...))` with an `apply` function; the command line, compare.py, MethodConfig and the
adapter files then know it. `python -m models.method_table` prints the README's tables of methods and flags.
"""
from __future__ import annotations

import torch
from torch import nn

from models.registry import (
    OPTIONS,
    Method,
    MethodConfig,
    Option,
    OptionError,
    at_least_one,
    boolean,
    combination_name,
    comma_list,
    define_option,
    describe_default,
    finite_number,
    flag_options,
    get_method,
    method_from_json,
    method_names,
    method_parts,
    method_to_json,
    one_of,
    parse_combination,
    parse_methods,
    parse_float,
    parse_int,
    probability,
    register_method,
    registered_methods,
    saved_form,
    subset_of,
    tokenize_text_options,
)
from modules.adapted_linear import target_overlap
from modules.ia3 import IA3_TARGETS, IA3GPT2Layer
from modules.kv_cache import KVCache
from modules.lora import LORA_TARGETS, LoRAGPT2Layer
from modules.prefix import KeyValuePrefix
from modules.reft import ACTIVATIONS, COMPONENTS, POSITIONS_RULE, PositionedIntervention, ReFTGPT2Layer, parse_positions
from modules.soft_prompt import ENCODERS, EncodedPrompt, SoftPrompt

__all__ = ["EXAMPLE_COMBINATION", "MethodConfig", "Method", "Option", "OptionError", "OPTIONS", "combination_name", "define_option",
           "describe_default", "flag_options", "get_method", "method_from_json", "method_names", "method_parts",
           "method_to_json", "parse_combination", "parse_methods", "register_method", "registered_methods", "saved_form",
           "tokenize_text_options"]


# ------------------------------------------------------------------------------------------------- options
AUTO_LAYERS = "auto:"  # --layers auto:K: the trainer picks the K layers a probe of the frozen model ranks best


def auto_layer_count(value) -> "int | None":
    """K of a `layers` value 'auto:K' (still to be chosen: tasks/layer_choice.py), None for fixed layers."""
    return int(value[len(AUTO_LAYERS):]) if isinstance(value, str) and value.startswith(AUTO_LAYERS) else None


def layer_indices(value):
    """Sorted distinct layer indices, or 'auto:K' as it is (K >= 1)."""
    if isinstance(value, str):
        count = value[len(AUTO_LAYERS):] if value.startswith(AUTO_LAYERS) else ""
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"must be layer indices or auto:K with K >= 1, got {value!r}")
        return f"{AUTO_LAYERS}{int(count)}"
    layers = sorted(set(int(i) for i in value))
    if not layers:
        raise ValueError("must name at least one layer (or be None for all)")
    return layers


def parse_layers(text: str):
    if text.strip().startswith(AUTO_LAYERS):
        return layer_indices(text.strip())
    try:
        return [int(item) for item in comma_list(text)]
    except ValueError:
        raise ValueError(f"must be comma-separated layer indices such as 0,5,11, or auto:K; got {text!r}") from None


def projection_targets(choices: dict):
    """A non-empty list of distinct targets among `choices` that do not overlap (c_attn and query, say)."""
    among = subset_of(tuple(choices))

    def check(value) -> tuple:
        targets = among(value)
        overlap = target_overlap(targets, choices)
        if overlap:
            raise ValueError(overlap)
        return targets
    return check


def text(value) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be a non-empty text, got {value!r}")
    return value


def token_ids(value) -> tuple[int, ...]:
    items = tuple(value) if isinstance(value, (list, tuple)) else None
    if not items or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise ValueError(f"must be a non-empty list of token ids, got {value!r}")
    return items


def check_positions(value: str) -> str:
    try:
        parse_positions(value)
    except ValueError:
        raise ValueError(f"{POSITIONS_RULE}; got {value!r}") from None
    return value


for _option in (
    Option("layers", "comma-separated layer indices to adapt, or auto:K: the K layers whose frozen hidden states "
           "serve the task best (a probe before training)", "--layers", parse_layers, layer_indices),
    Option("rank", "rank of the low-rank update or intervention", "--rank", parse_int, at_least_one),
    Option("alpha", "scale numerator: updates are scaled by alpha/rank", "--alpha", parse_float, finite_number),
    Option("dropout", "dropout inside the method's own path", "--method-dropout", parse_float, probability),
    Option("targets", f"LoRA, DoRA: comma-separated projections, among {', '.join(LORA_TARGETS)} (c_attn: all of "
           "q, k and v with one shared A, peft's GPT-2 default)", "--lora-targets", comma_list,
           projection_targets(LORA_TARGETS), label="LoRA targets"),
    Option("rslora", "LoRA, DoRA: rank-stabilised scale alpha/sqrt(rank)", "--rslora", check=boolean, switch=True),
    Option("ia3_targets", f"(IA)^3: comma-separated activations to rescale, among {', '.join(IA3_TARGETS)} (ffn: "
           "the FFN's inner activation; peft's GPT-2 default is c_attn,ffn)", "--ia3-targets", comma_list,
           projection_targets(IA3_TARGETS), label="(IA)^3 targets"),
    Option("components", "ReFT: where in each layer, attention and/or ffn (the layer's output), comma-separated",
           "--reft-components", comma_list, subset_of(COMPONENTS), label="ReFT components"),
    Option("positions", "ReFT: 'all' or first/last prompt tokens such as f1+l1, l1, f2+l2", "--positions",
           check=check_positions),
    Option("tie_positions", "ReFT: one intervention per position instead of one shared by all",
           "--untie-positions", check=boolean, switch=False),
    Option("activation", "ReFT: activation inside the intervention", "--activation", check=one_of(tuple(ACTIVATIONS)),
           choices=tuple(ACTIVATIONS)),
    Option("name", "ReFT: the adapter's name, so that several adapters can share a model"),
    Option("num_virtual_tokens", "soft prompts and prefixes: how many virtual tokens come before every input",
           "--num-virtual-tokens", parse_int, at_least_one),
    Option("prompt_init_text", "soft prompts and prefixes: start from this text's tokens (repeated to the length) "
           "instead of random vocabulary tokens", "--prompt-init-text", check=text, unset="random tokens",
           tokenized_into="prompt_init_ids"),
    Option("prompt_init_ids", "the token ids of prompt_init_text under the run's tokenizer (apply_method fills them "
           "in when given the tokenizer)", check=token_ids, unset="from the text"),
    Option("encoder", "P-tuning: the prompt encoder", "--encoder", check=one_of(ENCODERS), choices=ENCODERS),
    Option("encoder_hidden", "P-tuning: the prompt encoder's hidden width", "--encoder-hidden", parse_int,
           at_least_one),
    Option("prefix_projection", "prefix: reparametrise the prefix while training as an MLP of this hidden width "
           "(folded away when saved)", "--prefix-projection", parse_int, at_least_one, unset="off"),
):
    define_option(_option)


# ------------------------------------------------------------------------------------------------- methods
def method_from_saved(raw: dict, version: int) -> MethodConfig:
    """A method as an adapter file of format `version` (models/peft.py) records it. Before version 2, `direft` was
    h + W2^T (W1 h + b) with W2 free, today's `nodireft`; `direft` now means pyreft's DiReFT, with R orthonormal."""
    if version < 2 and isinstance(raw, dict) and raw.get("method") == "direft":
        raw = {**raw, "method": "nodireft"}
    return MethodConfig.from_dict(raw)


def train_everything(gpt, config, layers) -> None:
    """Full fine-tuning: the base stays trainable."""


def train_head_only(gpt, config, layers) -> None:
    """Nothing inside GPT-2 trains: the task's head (built around it) is all that learns."""


def unfreeze(gpt, config, layers, wanted) -> None:
    """Makes trainable the parameters `wanted(module, name)` picks in the chosen layers (and ln_f with all)."""
    chosen = [gpt.h[index] for index in layers] + ([gpt.ln_f] if config.layers is None else [])
    for module in (sub for part in chosen for sub in part.modules()):
        for name, param in module.named_parameters(recurse=False):
            param.requires_grad_(wanted(module, name))


def lora_applier(dora: bool):
    """LoRA and DoRA share their options and their layer wrapper (modules/lora.py)."""
    def add_lora(gpt, config, layers) -> None:
        for index in layers:
            gpt.h[index] = LoRAGPT2Layer(gpt.h[index], config.targets, config.rank, config.alpha, config.dropout,
                                         rank_stabilized=config.rslora, dora=dora)
    return add_lora


def add_ia3(gpt, config, layers) -> None:
    for index in layers:
        gpt.h[index] = IA3GPT2Layer(gpt.h[index], config.ia3_targets)


def reft_applier(orthogonal: bool, subtract_projection: bool, linear_source: bool = True):
    """The ReFT family differs only in three flags of the one intervention class (modules/reft.py)."""
    def add_interventions(gpt, config, layers) -> None:
        for index in layers:
            layer = gpt.h[index]
            if not isinstance(layer, ReFTGPT2Layer):
                if not all(callable(getattr(layer, name, None)) for name in ("attention_block", "ffn_block")):
                    # A combination's weight-space wrapper must expose the sublayers ReFT intervenes between.
                    raise TypeError(f"{config.method} cannot wrap layer {index}: {type(layer).__name__} has no "
                                    "attention_block / ffn_block")
                gpt.h[index] = ReFTGPT2Layer(layer)
            for component in config.components:
                gpt.h[index].add(component, config.name, PositionedIntervention(
                    gpt.config.n_embd, config.rank, config.positions, config.tie_positions,
                    orthogonal=orthogonal, subtract_projection=subtract_projection, linear_source=linear_source,
                    activation=config.activation or "identity", dropout=config.dropout or 0.0,
                    scale=config.alpha / config.rank,
                ))
    return add_interventions


def initial_token_ids(gpt, config) -> torch.Tensor:
    """The n tokens virtual tokens start from: the init text's (cycled to n), else n random vocabulary tokens."""
    n, vocab = config.num_virtual_tokens, gpt.config.vocab_size
    if config.prompt_init_ids is not None:
        ids = list(config.prompt_init_ids)
        if max(ids) >= vocab:
            raise ValueError(f"prompt_init_ids holds token {max(ids)}, beyond this model's vocabulary of {vocab}")
        ids = (ids * (n // len(ids) + 1))[:n]
    elif config.prompt_init_text is not None:
        raise ValueError("--prompt-init-text needs the run's tokenizer: pass it to apply_method(gpt, config, "
                         "tokenizer=...), or give prompt_init_ids")
    else:
        ids = torch.randint(0, vocab, (n,)).tolist()
    return torch.tensor(ids, device=gpt.wte.weight.device)


def initial_embeddings(gpt, config) -> torch.Tensor:
    return gpt.wte.weight.detach()[initial_token_ids(gpt, config)].float()


def add_soft_prompt(gpt, config, layers) -> None:
    gpt.add_virtual_tokens(SoftPrompt(initial_embeddings(gpt, config)))


def add_encoded_prompt(gpt, config, layers) -> None:
    gpt.add_virtual_tokens(EncodedPrompt(initial_embeddings(gpt, config), config.encoder, config.encoder_hidden))


def add_prefix(gpt, config, layers) -> None:
    """Without a projection the prefix starts as the keys and values the frozen model gives the initial tokens
    (Li & Liang's initialisation from real words): a hard prompt, which training then moves."""
    c = gpt.config
    if config.prefix_projection is not None:
        initial = initial_embeddings(gpt, config)
    elif gpt.wte.weight.is_meta:  # a skeleton (shapes only): nothing to compute
        initial = torch.empty(len(layers), 2, c.n_head, config.num_virtual_tokens, c.head_dim, device="meta")
    else:
        ids = initial_token_ids(gpt, config)
        cache = KVCache.for_model(c, 1, gpt.virtual_length + len(ids))
        was_training = gpt.training
        with torch.no_grad():
            gpt.eval()(ids[None], cache=cache)
        gpt.train(was_training)
        initial = torch.stack([cache.keys[layers, 0], cache.values[layers, 0]], dim=1)[..., -len(ids):, :].float()
    gpt.add_virtual_tokens(KeyValuePrefix(c.n_layer, c.n_head, initial, config.prefix_projection,
                                          None if config.layers is None else layers))


def alpha_equals_rank(options: dict) -> float:
    """= rank"""
    return float(options["rank"])


LORA_OPTIONS = {"layers": None, "rank": 8, "alpha": 16.0, "dropout": 0.0, "targets": ("query", "value"), "rslora": False}
REFT_OPTIONS = {"layers": None, "rank": 4, "alpha": alpha_equals_rank, "dropout": 0.0, "components": ("ffn",),
                "positions": "f1+l1", "tie_positions": True, "activation": "identity", "name": "default"}
# ConsReFT and LobiReFT edit by a constant b: no activation or dropout to apply to it.
CONSTANT_SOURCE_OPTIONS = {name: value for name, value in REFT_OPTIONS.items() if name not in ("activation", "dropout")}

for _method in (
    Method("full", "everything", train_everything, lr=1e-5, freezes_base=False, family="base"),
    Method("last-linear-layer", "the task head only", train_head_only, adapts_gpt2=False, family="head"),
    Method("bitfit", "every bias", lambda gpt, config, layers: unfreeze(gpt, config, layers, lambda m, n: n == "bias"),
           {"layers": None}),
    Method("layernorm", "every LayerNorm's gain and bias (`ln_1`, `ln_2`; `ln_f` with all layers)",
           lambda gpt, config, layers: unfreeze(gpt, config, layers, lambda m, n: isinstance(m, nn.LayerNorm)),
           {"layers": None}),
    Method("lora", "`W x + (alpha/r) B A x` on chosen projections; A random, B zero", lora_applier(dora=False),
           LORA_OPTIONS),
    Method("dora", "LoRA's update, each output feature's weight row rescaled to a trained magnitude: "
           "`m (W + (alpha/r) B A) / norm(W + (alpha/r) B A)`, m starting at norm(W)", lora_applier(dora=True),
           LORA_OPTIONS),
    Method("ia3", "(IA)^3: vectors rescaling the keys, values and FFN inner activation, initialised to ones", add_ia3,
           {"layers": None, "ia3_targets": ("key", "value", "ffn")}, lr=3e-3),
    Method("reft", "adapter after a sublayer: `h + (alpha/r) up(dropout(act(down h)))`, up zero",
           reft_applier(orthogonal=False, subtract_projection=False),
           {**REFT_OPTIONS, "rank": 8, "components": ("attention", "ffn"), "positions": "all", "activation": "relu"},
           stacks=True, family="reft"),
    Method("loreft", "`h + R^T (W h + b - R h)` on a layer's output at chosen prompt positions, R orthonormal "
           "(kept in fp32)", reft_applier(orthogonal=True, subtract_projection=True), REFT_OPTIONS, stacks=True, family="reft"),
    Method("noreft", "as loreft, R not orthogonal", reft_applier(orthogonal=False, subtract_projection=True),
           REFT_OPTIONS, stacks=True, family="reft"),
    Method("consreft", "`h + R^T (b - R h)`, R orthonormal: h's component in R's subspace set to a trained b (does "
           "not start as the identity)", reft_applier(orthogonal=True, subtract_projection=True, linear_source=False),
           CONSTANT_SOURCE_OPTIONS, stacks=True, family="reft"),
    Method("direft", "`h + R^T (W h + b)`, R orthonormal (pyreft's DiReFT)",
           reft_applier(orthogonal=True, subtract_projection=False), REFT_OPTIONS, stacks=True, family="reft"),
    Method("nodireft", "`h + W2^T (W1 h + b)`, W2 free (the ReFT paper's DiReFT; `direft` before adapter format 2)",
           reft_applier(orthogonal=False, subtract_projection=False), REFT_OPTIONS, stacks=True, family="reft"),
    Method("lobireft", "`h + R^T b`, R orthonormal: a trained shift within R's subspace",
           reft_applier(orthogonal=True, subtract_projection=False, linear_source=False), CONSTANT_SOURCE_OPTIONS,
           stacks=True, family="reft"),
    Method("prompt", "n virtual token embeddings before every input (prompt tuning)", add_soft_prompt,
           {"num_virtual_tokens": 20, "prompt_init_text": None, "prompt_init_ids": None}, lr=1e-2, family="prompt"),
    Method("ptuning", "n virtual token embeddings made by a prompt encoder (P-tuning); saved folded as `prompt`'s "
           "n x d embeddings", add_encoded_prompt, {"num_virtual_tokens": 20, "encoder": "mlp", "encoder_hidden": 768},
           lr=1e-3, family="prompt",
           saved_as=lambda config: MethodConfig("prompt", num_virtual_tokens=config.num_virtual_tokens)),
    Method("prefix", "keys and values of n virtual positions in each chosen layer's attention (prefix tuning); a "
           "projection, if any, is folded away when saved", add_prefix,
           {"layers": None, "num_virtual_tokens": 20, "prompt_init_text": None, "prompt_init_ids": None, "prefix_projection": None},
           lr=5e-3, family="prompt",
           saved_as=lambda config: MethodConfig.from_dict({**config.to_dict(), "prefix_projection": None})),
):
    register_method(_method)

# What help texts and the README show as a combination (tasks/ and models/peft.py name no method themselves).
EXAMPLE_COMBINATION = "lora+loreft"
