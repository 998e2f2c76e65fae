"""GPT-2 configuration: one dataclass, the four OpenAI sizes and a tiny one for tests and smoke runs."""
from __future__ import annotations

import dataclasses
import json
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
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPT2Config: n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPT2Config.dropout must be in [0, 1), got {self.dropout}")

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
        return cls(**fields)

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


PRESETS = {
    "gpt2": GPT2Config(n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(n_embd=1600, n_layer=48, n_head=25),
    # Real vocabulary (so the real tokenizer works with it), toy width and depth.
    "tiny": GPT2Config(n_embd=64, n_layer=2, n_head=4),
}
