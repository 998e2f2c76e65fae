"""LoRA (Hu et al., 2021) and DoRA (Liu et al., 2024) on chosen projections of a frozen GPT2Layer.

LoRA: W x + s B A x, s = alpha / r (alpha / sqrt(r) with rsLoRA). DoRA: the same update, then each output
feature's weight row is rescaled to a trained magnitude m: W' = m (W + s B A) / ||W + s B A|| (the norm of each
output feature's row of the (out, in) weight: a column of the (in, out) Conv1D layout of the checkpoint).
B starts at zero and m at ||W||, so a freshly wrapped layer computes exactly what the base layer does. Both
merge into W for inference at no extra cost and unmerge again (modules/adapted_linear.py).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from modules.adapted_linear import ALL_ROWS, AdaptedGPT2Layer, WeightUpdate, check_targets, rows_of

# target -> (projection inside GPT2Layer, which third of the fused q|k|v output, or None for all of it).
# `c_attn` is the whole fused projection with one A shared by q, k and v: peft's default LoRA target on GPT-2.
LORA_TARGETS = {
    "query": ("attn.c_attn", 0),
    "key": ("attn.c_attn", 1),
    "value": ("attn.c_attn", 2),
    "c_attn": ("attn.c_attn", None),
    "attn_out": ("attn.c_proj", None),
    "mlp_in": ("mlp.c_fc", None),
    "mlp_out": ("mlp.c_proj", None),
}


class LoRAAdapter(WeightUpdate):
    """The trainable low-rank update: delta(x) = scale * B A dropout(x), added to its rows of the output."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 rank_stabilized: bool = False):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # nn.Linear's own init for a (rank x in) matrix
        # rsLoRA (Kalajdzievski, 2023) divides by sqrt(r) so that larger ranks keep learning.
        self.scale = alpha / math.sqrt(rank) if rank_stabilized else alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return (self.B.float() @ self.A.float()) * self.scale

    def adapt_output(self, x, out, rows, weight, bias):
        if rows == ALL_ROWS:
            return out + self(x).to(out.dtype)
        # In place is safe: the matmul's backward needs its inputs, not its output.
        out[..., rows] += self(x).to(out.dtype)
        return out

    def merge_into(self, weight, bias, rows) -> None:
        weight[rows] += self.delta_weight()


class DoRAAdapter(LoRAAdapter):
    """LoRA's update with a trained magnitude per output feature: its rows of the output become
    m / ||W + s B A|| * (W x + s B A dropout(x)) + bias. As in the paper (section 4.3) and peft, the norm is
    treated as a constant in the backward pass (no gradient flows through it), which saves its activation memory;
    the forward value is the formula's. Dropout acts on the low-rank branch only (peft also drops out the input
    of W's rescaled copy; with dropout 0, the default, the two agree)."""

    def __init__(self, weight: torch.Tensor, rank: int, alpha: float, dropout: float = 0.0,
                 rank_stabilized: bool = False):
        super().__init__(weight.shape[1], weight.shape[0], rank, alpha, dropout, rank_stabilized)
        with torch.no_grad():
            self.magnitude = nn.Parameter(torch.linalg.norm(weight.float(), dim=1))  # ||W + s B A|| with B = 0

    @torch.no_grad()
    def weight_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight.float() + self.delta_weight(), dim=1)

    def adapt_output(self, x, out, rows, weight, bias):
        scale = self.magnitude / self.weight_norm(weight[rows])
        own_bias = 0.0 if bias is None else bias[rows].float()
        adapted = (scale * (out[..., rows].float() - own_bias + self(x).float()) + own_bias).to(out.dtype)
        if rows == ALL_ROWS:
            return adapted
        out[..., rows] = adapted
        return out

    def merge_into(self, weight, bias, rows) -> None:
        scale = self.magnitude.float() / self.weight_norm(weight[rows])
        weight[rows] = scale[:, None] * (weight[rows] + self.delta_weight())


class LoRAGPT2Layer(AdaptedGPT2Layer):
    """Wraps a GPT2Layer, freezes it, and adds LoRA (or DoRA, `dora=True`) adapters, in `self.lora` keyed by
    target, to the chosen projections."""

    def __init__(self, layer: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
                 rank_stabilized: bool = False, dora: bool = False):
        super().__init__(layer)
        method = "DoRA" if dora else "LoRA"
        check_targets(targets, LORA_TARGETS, method)
        self.lora = nn.ModuleDict()
        parts = []
        for target in targets:
            path, third = LORA_TARGETS[target]
            linear = layer.get_submodule(path)
            rows = rows_of(third, linear.out_features)
            if dora:
                self.lora[target] = DoRAAdapter(linear.weight[rows], rank, alpha, dropout, rank_stabilized)
            else:
                width = linear.weight[rows].shape[0]
                self.lora[target] = LoRAAdapter(linear.in_features, width, rank, alpha, dropout, rank_stabilized)
            parts.append((path, self.lora[target], rows))
        self.install(parts, method)
