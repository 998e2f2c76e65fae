"""One GPT-2 transformer block: pre-LayerNorm attention and feed-forward sublayers with residuals."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from modules.attention import CausalSelfAttention
from modules.context import ForwardContext


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 was trained with the tanh approximation of GELU; the exact erf form drifts by ~1e-3.
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class GPT2Layer(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)).

    The two sublayers are separate methods so that wrappers (ReFT) can act on the hidden state between
    them without re-implementing the block.
    """

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def attention_block(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return x + self.attn(self.ln_1(x), ctx)

    def ffn_block(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln_2(x))

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.ffn_block(self.attention_block(x, ctx))
