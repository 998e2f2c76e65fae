"""GPT-2 configuration: one dataclass, the four OpenAI sizes, a tiny one for tests and smoke runs, and the small one pretrained here."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass


@dataclass
class GPT2Config:
    # Field names follow the Hugging Face config.json, so a hub config maps onto this one directly.
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    layer_norm_epsilon: float = 1e-5
    # One dropout rate for embeddings, attention probabilities and residual branches (GPT-2 uses 0.1).
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        epsilon, dropout = self.layer_norm_epsilon, self.dropout
        if not is_number(epsilon) or not 0 < epsilon < math.inf:
            # A negative one makes LayerNorm divide by the square root of a negative variance: NaN at once.
            raise ValueError(f"GPT2Config.layer_norm_epsilon must be a positive number, got {epsilon!r}")
        if not is_number(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"GPT2Config.dropout must be a number in [0, 1), got {dropout!r}")

    def parameter_count(self) -> int:
        """Parameters of a GPT2Model of this shape (the LM head is tied to the token embedding)."""
        d = self.n_embd
        return (self.vocab_size + self.n_positions) * d + self.n_layer * (12 * d * d + 13 * d) + 2 * d

    def check_memory(self, source: str = "GPT2Config") -> None:
        """Refuses, before anything is allocated, a shape whose fp32 weights alone exceed this machine's memory
        (a config.json saying n_positions 10**9, say), naming the field that makes it so large."""
        total = physical_memory_bytes()
        needed = 4 * self.parameter_count()
        if total is None or needed <= total:
            return
        d = self.n_embd
        parts = {  # each part's parameters and the fields that size it
            f"the token embedding (vocab_size {self.vocab_size} x n_embd {d})": self.vocab_size * d,
            f"the position embedding (n_positions {self.n_positions} x n_embd {d})": self.n_positions * d,
            f"the layers (n_layer {self.n_layer} x 12 x n_embd {d}^2)": self.n_layer * 12 * d * d,
        }
        largest = max(parts, key=parts.get)
        raise ValueError(f"{source}: this GPT-2 shape has {self.parameter_count():.3g} parameters, "
                         f"{needed / 2**30:,.1f} GiB in fp32, more than this machine's {total / 2**30:,.1f} GiB of "
                         f"memory; most of it is {largest}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown GPT-2 size {name!r}; choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> "GPT2Config":
        """Reads a Hugging Face GPT-2 config.json; the three HF dropout rates must agree (they do for OpenAI's)."""
        try:
            fields = {name: raw[name] for name in ("vocab_size", "n_embd", "n_layer", "n_head")}
        except KeyError as missing:
            raise ValueError(f"{source}: missing key {missing} (is this a GPT-2 config.json?)") from None
        fields["n_positions"] = raw.get("n_positions", raw.get("n_ctx", 1024))
        fields["layer_norm_epsilon"] = raw.get("layer_norm_epsilon", 1e-5)
        fields["dropout"] = raw.get("resid_pdrop", 0.1)
        try:
            config = cls(**fields)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        config.check_memory(source)
        return config

    def to_hf_dict(self) -> dict:
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "activation_function": "gelu_new",
        }

    def to_json(self) -> str:
        return json.dumps(self.to_hf_dict(), indent=2) + "\n"


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def physical_memory_bytes():
    """This machine's memory, or None where the platform does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


PRESETS = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    # Real vocabulary (so the real tokenizer works with it), toy width and depth.
    "tiny": GPT2Config(n_embd=64, n_layer=2, n_head=4),
    # What `python -m tasks.pretrain` trains from scratch on the course's texts (README: "A small GPT-2 pretrained
    # here"): the real vocabulary, whose embedding is most of its 7.3M parameters, and a 256-token context.
    "small": GPT2Config(n_embd=128, n_layer=4, n_head=4, n_positions=256),
}
