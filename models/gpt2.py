"""GPT2Model: token + position embeddings, a stack of GPT2Layers, a final LayerNorm, a tied LM head."""
from __future__ import annotations

import contextlib
import math
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from data.atomic import atomic_save
from models.base_identity import record_base
from models.config import GPT2Config
from models.loading import (
    CheckpointError,
    check_state_dict,
    hf_to_ours,
    locate_checkpoint,
    ours_to_hf,
    read_config,
    read_state_dict,
)
from modules.attention import build_attention_mask
from modules.context import ForwardContext
from modules.gpt2_layer import GPT2Layer
from modules.kv_cache import KVCache
from modules.virtual_tokens import VirtualTokens

PRECISIONS = ("fp32", "bf16")
PRECISION_CHOICES = ("auto",) + PRECISIONS  # what command lines offer: auto resolves per device
PRECISION_HELP = ("auto (default): bf16 on a GPU or a CPU with bf16 instructions, else fp32; bf16: frozen weights "
                  "stored and matmuls run in bf16; fp32 reproduces the reference implementation exactly")


def resolve_precision(requested: str, device: torch.device) -> str:
    """'auto' is bf16 where it pays: a GPU with bf16 support, or a CPU with bf16 instructions."""
    if requested not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {requested!r}")
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


class GPT2Model(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        if torch.get_default_device().type != "meta":  # a meta skeleton allocates nothing
            config.check_memory()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(GPT2Layer(config, i) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.precision = "fp32"
        # Optional store of the frozen layers' outputs (tasks/feature_cache.py attaches one for a training run):
        # asked by `forward` for the hidden states entering the first trainable layer, by `last_token` for the
        # final features when nothing in GPT-2 trains.
        self.frozen_cache = None
        # True where a frozen cache stores `gradient_free_prefix`'s output: it then runs without dropout, and
        # evaluation takes the same prefix/suffix split as training so that it can reuse it.
        self.prefix_cacheable = False
        # Trained positions before every sequence (a soft prompt or a prefix, modules/virtual_tokens.py), set by a
        # method through add_virtual_tokens; None without.
        self.add_module("virtual_tokens", None)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch's output projection shrinks with depth, so the
        # residual stream's variance does not grow with the number of layers.
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        record_base(self, None)  # what adapters trained on this model record; from_pretrained names it

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ virtual tokens
    def add_virtual_tokens(self, part: VirtualTokens) -> None:
        """Gives the model `part`'s virtual tokens, which every sequence's first chunk then starts with."""
        if not isinstance(part, VirtualTokens):
            raise TypeError(f"add_virtual_tokens expects a VirtualTokens module, got {type(part).__name__}")
        if self.virtual_tokens is not None:
            raise ValueError(f"this model already has {self.virtual_tokens.length} virtual tokens "
                             f"({type(self.virtual_tokens).__name__}); a model takes at most one soft prompt or prefix")
        self.virtual_tokens = part

    @property
    def virtual_length(self) -> int:
        """How many positions the virtual tokens occupy before every sequence's real tokens (0 without)."""
        return 0 if self.virtual_tokens is None else self.virtual_tokens.length

    @property
    def input_capacity(self) -> int:
        """The most real tokens one sequence can hold: the context less the virtual tokens."""
        return self.config.n_positions - self.virtual_length

    # ------------------------------------------------------------------ forward
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor,
              virtual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token + position embeddings; `virtual` (n, d) embeddings come first, as n more columns."""
        # The residual stream is kept in fp32 even when the embedding table is stored in bf16.
        tokens = self.wte(input_ids).float()
        if virtual is not None:
            tokens = torch.cat([virtual.float().expand(input_ids.shape[0], -1, -1), tokens], dim=1)
        return self.drop(tokens + self.wpe(positions).float())

    def encode(self, hidden: torch.Tensor, ctx: ForwardContext, start: int = 0) -> torch.Tensor:
        """Runs layers `start`.. and the final LayerNorm on the hidden states entering layer `start` (n_layer: the
        final LayerNorm only; n_layer + 1: nothing, the hidden states are final)."""
        for layer in self.h[start:]:
            hidden = layer(hidden, ctx)
        return self.ln_f(hidden) if start <= self.config.n_layer else hidden

    def hidden_states_entering(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                               prompt_mask: Optional[torch.Tensor], stop: int) -> torch.Tensor:
        """(B, T, d): the hidden states entering layer `stop`, the embeddings through layers 0..stop-1 (stop =
        n_layer + 1: through the final LayerNorm too); what a cache of the frozen layers stores (`frozen_cache`)."""
        ctx = self.make_context(input_ids, attention_mask, None, prompt_mask)
        with self.autocast():
            hidden = self.embed(input_ids, self._positions(ctx, input_ids.shape[1]))
            for layer in self.h[:stop]:
                hidden = layer(hidden, ctx)
            return self.ln_f(hidden) if stop > self.config.n_layer else hidden

    def frozen_boundary(self) -> int:
        """Where the part of the model no trainable parameter can influence ends: the index of the first layer that
        holds a trainable parameter (0 when the embeddings, or a parameter outside the layers, train: nothing
        below it), n_layer when only the final LayerNorm trains, n_layer + 1 when nothing trains. The hidden states
        entering that layer are the same in every epoch (with dropout off below it): `frozen_cache` may store them."""
        n_layer, boundary = self.config.n_layer, self.config.n_layer + 1
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            parts = name.split(".")
            if parts[0] == "h":
                boundary = min(boundary, int(parts[1]))
            elif parts[0] == "ln_f":
                boundary = min(boundary, n_layer)
            else:
                return 0  # the embeddings, or what a method added around the layers (virtual tokens, prefixes)
        # Virtual tokens, trained or not, add input columns or keys below every layer, which hidden states
        # entering a layer (as `hidden_states_entering` computes them for the real tokens) would leave out.
        return 0 if self.virtual_tokens is not None else boundary

    def set_dropout_below(self, boundary: int) -> "GPT2Model":
        """Turns dropout off in the embeddings and layers 0..boundary-1 (every nn.Dropout there, and attention
        probabilities'), whatever the mode: their outputs are then the same in every epoch."""
        parts = ([self.drop] if boundary > 0 else []) + list(self.h[:boundary])
        for part in parts:
            for module in part.modules():
                if isinstance(module, nn.Dropout):
                    module.p = 0.0
                if isinstance(getattr(module, "dropout", None), float):
                    module.dropout = 0.0  # attention: a number SDPA applies to the probabilities
        return self

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cache: Optional[KVCache] = None,
        prompt_mask: Optional[torch.Tensor] = None,
        entering: Optional[tuple[int, torch.Tensor]] = None,
    ) -> dict[str, torch.Tensor]:
        """input_ids (B, T); attention_mask (B, T), 1 at real tokens, padding on either side.

        Returns `last_hidden_state` (B, T, d), after the final LayerNorm, and `last_token` (B, d), the hidden
        state at each row's last real token. With a `cache`, the chunk continues the cached sequence.
        `prompt_mask` marks the prompt tokens interventions may act on; it defaults to the real tokens of a
        first chunk and to none for a continuation (a decoding step). `entering` = (start, hidden): the hidden states
        (B, T, d) entering layer `start`, computed elsewhere, so that the layers below are skipped; without it, a
        first chunk asks `frozen_cache` (when one is attached) for them.

        A sequence's first chunk (no cache, or an empty one) starts with the virtual tokens, if any: positions
        0..n-1 are theirs and the real tokens follow at n, n+1, ... (counting real tokens only, whatever the
        padding). The outputs cover the real tokens only.
        """
        virtual = self.virtual_tokens if cache is None or cache.length == 0 else None
        embeddings = None if virtual is None else virtual.input_embeddings()
        key_values = None if virtual is None else virtual.key_values()
        extra_inputs = 0 if embeddings is None else embeddings.shape[0]
        extra_keys = 0 if key_values is None else key_values.shape[3]
        ctx = self.make_context(input_ids, attention_mask, cache, prompt_mask, extra_inputs, extra_keys)
        ctx.virtual_key_values = key_values
        if self.virtual_tokens is not None and self.virtual_tokens.keyless_layers:  # every chunk of the sequence
            ctx.virtual_keys, ctx.keyless_layers = self.virtual_tokens.length, self.virtual_tokens.keyless_layers
        if entering is None and cache is None and self.frozen_cache is not None:
            entering = self.frozen_cache.entering(self, input_ids, attention_mask, ctx.prompt_mask)
        with self.autocast():
            if entering is None:
                positions = self._positions(ctx, extra_inputs + input_ids.shape[1])
                start, hidden = 0, self.embed(input_ids, positions, embeddings)
            else:
                start, hidden = entering
            hidden = self.encode(hidden, ctx, start)[:, extra_inputs:]
        if cache is not None:
            cache.advance(extra_keys + extra_inputs + input_ids.shape[1])
        return {"last_hidden_state": hidden, "last_token": last_real_token(hidden, attention_mask)}

    def last_token(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, d): what `forward(...)["last_token"]` returns. While gradients are recorded and only each row's last
        k prompt tokens can depend on a trainable parameter (`trainable_suffix_length`), it is computed by
        `forward_trainable_suffix` instead: the same values and gradients for a fraction of the training cost (in
        evaluation too with `prefix_cacheable`, so that a frozen cache's prefix serves there as well)."""
        if self.frozen_cache is not None:
            cached = self.frozen_cache.last_token(self, input_ids, attention_mask)
            if cached is not None:
                return cached
        k = self.trainable_suffix_length() if torch.is_grad_enabled() or self.prefix_cacheable else None
        if k is None or k >= input_ids.shape[1]:
            return self(input_ids, attention_mask)["last_token"]
        return self.forward_trainable_suffix(input_ids, attention_mask, k)

    def trainable_suffix_length(self) -> Optional[int]:
        """k when every trainable parameter of the model belongs to modules that act on each row's last k prompt
        tokens only: then training can change the hidden states of those tokens only. A module says so through a
        `suffix_reach` attribute (k, or None when it acts elsewhere too; modules/reft.py's interventions have
        one). None when anything else trains (a weight, an intervention at 'all' or first tokens, virtual tokens,
        which every token attends to) or nothing does."""
        k, covered = 0, set()
        for module in self.modules():
            if hasattr(type(module), "suffix_reach"):
                params = [p for p in module.parameters() if p.requires_grad]
                if not params:
                    continue
                reach = module.suffix_reach
                if reach is None:
                    return None
                k = max(k, reach)
                covered.update(id(p) for p in params)
        if k == 0 or any(p.requires_grad and id(p) not in covered for p in self.parameters()):
            return None
        return k

    def forward_trainable_suffix(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                                 k: int) -> torch.Tensor:
        """`forward(...)["last_token"]` for a model whose trainable parameters act on the last k prompt tokens only
        (see `trainable_suffix_length`), with gradients recorded for those k tokens only.

        Why it is exact: attention is causal, so a token's hidden states depend on the tokens up to it and the
        parameters acting on those alone; no trainable parameter acts before the last k prompt tokens, so nothing
        computed there has a gradient. Rows are first moved to left padding (positions count real tokens only,
        so no output changes), which puts every row's last k tokens in the last k columns. The columns before
        run through every layer without recording gradients and leave their keys and values in a cache; the last
        k columns then run with gradients, attending to the cached keys and values, and the interventions find
        their slots among them (the prompt's last k tokens). Autograd keeps (B, k, d) activations instead of
        (B, T, d) and back-propagates through k tokens instead of T.
        """
        length = input_ids.shape[1]
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        input_ids, mask = left_align(input_ids, mask)
        split = length - k
        prefix = None if self.frozen_cache is None else self.frozen_cache.prefix(self, input_ids, mask, split)
        cache, entering = prefix if prefix is not None else self.gradient_free_prefix(input_ids, mask, split)
        suffix_mask = mask[:, split:]
        return self(input_ids[:, split:], suffix_mask, cache=cache, prompt_mask=suffix_mask.bool(),
                    entering=entering)["last_token"]

    def gradient_free_prefix(self, input_ids: torch.Tensor, mask: torch.Tensor, split: int):
        """For left-aligned rows (`forward_trainable_suffix`): a frozen KVCache holding the keys and values of the
        columns before `split`, computed without gradients, and what the columns from `split` on start from: None
        (the embeddings), or (start, hidden) entering the first trainable layer `start`. The layers below that one
        run once over whole rows. With `prefix_cacheable` the prefix runs without dropout, so that its keys and
        values are the same every epoch (a frozen cache may then store them)."""
        batch, length = input_ids.shape
        cache = KVCache.for_model(self.config, batch, self.virtual_length + length)
        start, hidden = self.frozen_boundary(), None
        was_training = self.training
        with torch.no_grad():
            if self.prefix_cacheable:
                self.eval()
            try:
                if start > 0:
                    hidden = self.hidden_states_entering(input_ids, mask, mask.bool(), start)
                no_prompt = torch.zeros_like(mask[:, :split], dtype=torch.bool)  # no intervention acts here
                self(input_ids[:, :split], mask[:, :split], cache=cache, prompt_mask=no_prompt,
                     entering=None if hidden is None else (start, hidden[:, :split]))
            finally:
                self.train(was_training)
        cache.freeze()  # the suffix's keys carry gradients: concatenated to the cached ones, not written in place
        return cache, None if hidden is None else (start, hidden[:, split:])

    def hidden_state_to_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits through the token embedding (GPT-2 ties its LM head to it)."""
        with self.autocast():
            return hidden @ self.wte.weight.t()

    def make_context(self, input_ids, attention_mask, cache, prompt_mask, extra_inputs: int = 0,
                     extra_keys: int = 0) -> ForwardContext:
        """The chunk's masks; `extra_inputs` virtual columns come before its tokens, or `extra_keys` virtual keys
        before its keys (virtual tokens: always real, never prompt positions)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        past = cache.length if cache is not None else 0
        total = past + extra_inputs + extra_keys + length
        if total > self.config.n_positions:
            virtual = f" ({self.virtual_length} of them the method's virtual tokens)" if self.virtual_length else ""
            raise ValueError(
                f"sequence of {total} tokens{virtual} exceeds the model context of {self.config.n_positions}; "
                "truncate the input (the tokenizer's max_length does this)"
            )
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
            )
        chunk_real = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        if prompt_mask is None and past == 0:
            prompt_mask = chunk_real
        if prompt_mask is not None:
            prompt_mask = prompt_mask.bool()
        virtual = chunk_real.new_ones(batch, extra_inputs + extra_keys)
        if extra_inputs:
            chunk_real = torch.cat([virtual, chunk_real], dim=1)
            prompt_mask = None if prompt_mask is None else torch.cat([~virtual, prompt_mask], dim=1)
        keys_real = torch.cat([virtual, chunk_real], dim=1) if extra_keys else chunk_real
        all_real = keys_real if cache is None else cache.extend_padding_mask(keys_real)
        padded = not bool(all_real.all())
        past, length = past + extra_keys, chunk_real.shape[1]
        if not padded and past == 0:
            attn_mask, is_causal = None, length > 1  # the fused causal kernel, no mask tensor
        elif not padded and length == 1:
            attn_mask, is_causal = None, False  # one new token sees everything before it
        else:
            attn_mask, is_causal = build_attention_mask(all_real, length, past), False
        return ForwardContext(
            padding_mask=chunk_real if padded else None,
            prompt_mask=prompt_mask,
            attn_mask=attn_mask,
            is_causal=is_causal,
            cache=cache,
            past_length=past,
        )

    def _positions(self, ctx: ForwardContext, length: int) -> torch.Tensor:
        """(B or 1, length): the chunk's positions. They count real tokens only, so a left-padded row sees the same
        positions as when run alone (for right padding this is the usual past..past+length-1 at every real token)."""
        if ctx.padding_mask is None:  # nothing padded anywhere in the sequence
            return torch.arange(ctx.past_length, ctx.past_length + length, device=self.wpe.weight.device)[None]
        if ctx.cache is not None:
            real = ctx.cache.padding_mask[:, : ctx.past_length + length]
        else:  # the only keys before the chunk are virtual ones, always real
            earlier = ctx.padding_mask.new_ones(ctx.padding_mask.shape[0], ctx.past_length)
            real = torch.cat([earlier, ctx.padding_mask], dim=1)
        return (real.long().cumsum(-1) - 1).clamp(min=0)[:, -length:]

    # ------------------------------------------------------------------ dropout and precision
    def set_dropout(self, rate: float) -> "GPT2Model":
        """Sets the base model's dropout rate (embeddings, attention probabilities, residual branches), overriding
        the checkpoint's. The parts a method adds (LoRA, interventions) keep their own rate."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {rate}")
        self.config.dropout = rate
        self.drop.p = rate
        for layer in self.modules():
            if isinstance(layer, GPT2Layer):
                layer.attn.dropout = rate  # a number: SDPA applies it to the attention probabilities
                layer.attn.resid_dropout.p = rate
                layer.mlp.dropout.p = rate
        return self

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.wte.weight.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def set_precision(self, precision: str) -> "GPT2Model":
        """'fp32', or 'bf16': matmuls run in bf16 under autocast and the frozen matrices (Linear layers and
        the embedding tables with requires_grad False) are stored in bf16 so no call re-casts them.
        LayerNorms, the residual stream and every trainable parameter stay fp32. 'auto' picks one for the
        model's device (`resolve_precision`)."""
        precision = resolve_precision(precision, self.wte.weight.device)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                for param in module.parameters(recurse=False):
                    if not param.requires_grad:
                        param.data = param.data.to(torch.bfloat16 if precision == "bf16" else torch.float32)
        self.precision = precision
        return self

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, name_or_path: Optional[str] = None, device: str = "cpu", *, model: Optional[str] = None,
                        d: Optional[int] = None, l: Optional[int] = None, num_heads: Optional[int] = None
                        ) -> "GPT2Model":
        """Loads a checkpoint (local directory, weights file, or hub name; default gpt2) or builds `random:<size>`
        weights. Returns the model in eval mode, in fp32; see `set_precision` for bf16.

        The CS224n starter's call shape works too: `from_pretrained(model='gpt2', d=768, l=12, num_heads=12)`;
        d, l and num_heads, when given, must match the checkpoint's n_embd, n_layer and n_head."""
        if model is not None and name_or_path is not None and str(model) != str(name_or_path):
            raise ValueError(f"GPT2Model.from_pretrained: name_or_path {name_or_path!r} and model {model!r} disagree; "
                             "give one of them")
        name = str(name_or_path or model or "gpt2")
        if name.startswith("random:"):
            size = name.split(":", 1)[1]
            config = GPT2Config.preset(size)
            warnings.warn(
                f"GPT2Model: random weights ({size} shape), not a pretrained model; fine for tests and speed "
                "measurements, meaningless for accuracy", stacklevel=2,
            )
            check_course_sizes(config, name, d, l, num_heads)
            gpt = cls(config)
        else:
            config_path, weights_path = locate_checkpoint(name)
            config = read_config(config_path)
            check_course_sizes(config, name, d, l, num_heads)
            gpt = cls(config)
            gpt.load_hf_state_dict(read_state_dict(weights_path), source=str(weights_path))
        record_base(gpt, name)
        return gpt.to(resolve_device(device)).eval()

    def load_hf_state_dict(self, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        ours = hf_to_ours(state, source)
        expected = self.state_dict()
        check_state_dict(expected, ours, source)
        with torch.no_grad():
            for name, tensor in ours.items():
                expected[name].copy_(tensor)
        record_base(self, source)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Writes config.json + model.safetensors in the hub's layout (readable by transformers too)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = ours_to_hf({name: t.detach().float().cpu() for name, t in self.state_dict().items()})
        atomic_save(lambda temp: save_file(state, temp, metadata={"format": "pt"}), directory / "model.safetensors")
        atomic_save(lambda temp: Path(temp).write_text(self.config.to_json()), directory / "config.json")
        return directory


def check_course_sizes(config: GPT2Config, name: str, d: Optional[int], l: Optional[int],
                       num_heads: Optional[int]) -> None:
    """The CS224n starter passes the model's sizes beside its name (d, l, num_heads): they must be the checkpoint's."""
    wrong = [f"{flag}={given} but it has {field} {actual}" for flag, given, field, actual in (
        ("d", d, "n_embd", config.n_embd), ("l", l, "n_layer", config.n_layer),
        ("num_heads", num_heads, "n_head", config.n_head)) if given is not None and given != actual]
    if wrong:
        raise ValueError(f"GPT2Model.from_pretrained({name!r}): " + "; ".join(wrong)
                         + " (leave d, l and num_heads out to take the checkpoint's sizes)")


def last_real_token(hidden: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """hidden (B, T, d) -> (B, d) at each row's last real position, whichever side the padding is on."""
    if attention_mask is None:
        return hidden[:, -1]
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_real_index(attention_mask)]


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask -> (B,) time index of each row's last real token."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(-1).to(torch.int8).argmax(-1)


def left_align(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rolls each row so that its last real token is in the last column: right padding becomes left padding."""
    length = input_ids.shape[1]
    shift = length - 1 - last_real_index(attention_mask)
    source = (torch.arange(length, device=input_ids.device)[None] - shift[:, None]) % length
    return input_ids.gather(1, source), attention_mask.gather(1, source)


def resolve_device(device: str | torch.device) -> torch.device:
    """'cpu', 'cuda', 'cuda:1' or 'auto' (a GPU when there is one)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r} is not supported; use cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA GPU is available; use --device cpu or auto")
    return device


__all__ = ["GPT2Model", "GPT2Config", "CheckpointError", "last_real_token", "left_align", "resolve_device"]
