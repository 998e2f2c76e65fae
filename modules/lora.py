"""LoRA (Hu et al., 2021): W x + (alpha / r) * B A x on chosen projections of a frozen GPT2Layer.

B starts at zero, so a freshly wrapped layer computes exactly what the base layer does. Updates can be
merged into W for inference at no extra cost and unmerged again.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

# target -> (projection inside GPT2Layer, which third of the fused q|k|v output, or None for all of it)
LORA_TARGETS = {
    "query": ("attn.c_attn", 0),
    "key": ("attn.c_attn", 1),
    "value": ("attn.c_attn", 2),
    "attn_out": ("attn.c_proj", None),
    "mlp_in": ("mlp.c_fc", None),
    "mlp_out": ("mlp.c_proj", None),
}


class LoRAAdapter(nn.Module):
    """The trainable low-rank update: delta(x) = scale * B A dropout(x)."""

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


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus low-rank updates on all or part of its output.

    It shares the base layer's weight and bias (no copy, same parameter names), and holds its adapters in a
    tuple so that they stay registered in one place only: the owning LoRAGPT2Layer's ModuleDict.
    """

    def __init__(self, base: nn.Linear, parts: Sequence[tuple[LoRAAdapter, Optional[slice]]]):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.parts = tuple(parts)
        self.merged = False
        self._unmerged_weight: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.merged:
            if self.training:
                raise RuntimeError("LoRA weights are merged; call unmerge() before training")
            return out
        for adapter, rows in self.parts:
            if rows is None:
                out = out + adapter(x)
            else:
                # In place is safe: the matmul's backward needs its inputs, not its output.
                out[..., rows] += adapter(x).to(out.dtype)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        # Kept so that unmerge restores the weight bit for bit (W + D - D is not always W in floating point).
        self._unmerged_weight = self.weight.detach().clone()
        merged = self.weight.float()
        for adapter, rows in self.parts:
            merged[rows if rows is not None else slice(None)] += adapter.delta_weight()
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self.merged = False


class LoRAGPT2Layer(nn.Module):
    """Wraps a GPT2Layer, freezes it, and adds LoRA adapters (in `self.lora`, keyed by target) to the chosen
    projections. The forward pass is the base layer's: its projections now include the updates."""

    def __init__(self, layer: nn.Module, targets: Sequence[str], rank: int, alpha: float, dropout: float = 0.0,
                 rank_stabilized: bool = False):
        super().__init__()
        unknown = sorted(set(targets) - LORA_TARGETS.keys())
        if unknown or not targets:
            raise ValueError(f"LoRA targets must be among {', '.join(LORA_TARGETS)}; got {list(targets)}")
        self.layer = layer.requires_grad_(False)
        self.lora = nn.ModuleDict()
        parts_by_projection = defaultdict(list)
        for target in targets:
            path, third = LORA_TARGETS[target]
            linear = layer.get_submodule(path)
            if isinstance(linear, LoRALinear):
                raise ValueError(f"LoRA is already applied to {path} of this layer")
            width = linear.out_features // 3 if third is not None else linear.out_features
            rows = slice(third * width, (third + 1) * width) if third is not None else None
            self.lora[target] = LoRAAdapter(linear.in_features, width, rank, alpha, dropout, rank_stabilized)
            parts_by_projection[path].append((self.lora[target], rows))
        for path, parts in parts_by_projection.items():
            parent, name = path.rsplit(".", 1)
            setattr(layer.get_submodule(parent), name, LoRALinear(layer.get_submodule(path), parts))

    def projections(self) -> list[LoRALinear]:
        return [m for m in self.layer.modules() if isinstance(m, LoRALinear)]

    def merge(self) -> None:
        for projection in self.projections():
            projection.merge()

    def unmerge(self) -> None:
        for projection in self.projections():
            projection.unmerge()

    # The updates live inside the wrapped layer's projections, so its sublayers are this layer's: a ReFT wrapper
    # around this one (a lora+loreft combination) intervenes between them as it does on a plain GPT2Layer.
    def attention_block(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.layer.attention_block(x, ctx)

    def ffn_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer.ffn_block(x)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        return self.layer(x, ctx)
