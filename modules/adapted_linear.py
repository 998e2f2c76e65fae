"""What the weight-space methods (LoRA, DoRA, (IA)^3) share: a frozen nn.Linear whose input or output rows a
trained update changes, mergeable into the weight, and the GPT2Layer wrapper that installs such updates.

An update is an nn.Module with up to three hooks, each acting on the rows (output features) it was given:
`adapt_input(x)` (it scales what enters the projection), `adapt_output(x, out, rows, weight, bias)` (it changes
the projection's output on its rows) and `merge_into(weight, bias, rows)` (the same change folded into fp32
copies of the weight and bias). Merging is then exact up to rounding, and unmerging restores the saved weight
and bias bit for bit.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

ALL_ROWS = slice(None)


class WeightUpdate(nn.Module):
    """The default hooks: no change. A subclass overrides those it needs (and sets `scales_input` when it
    overrides adapt_input)."""

    scales_input = False

    def adapt_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def adapt_output(self, x: torch.Tensor, out: torch.Tensor, rows: slice, weight: torch.Tensor,
                     bias: Optional[torch.Tensor]) -> torch.Tensor:
        return out

    def merge_into(self, weight: torch.Tensor, bias: Optional[torch.Tensor], rows: slice) -> None:
        """Folds the update into `weight` (out, in) and `bias` (out), fp32 copies, in place."""


class AdaptedLinear(nn.Linear):
    """A frozen nn.Linear plus updates on all or part of its output.

    It shares the base layer's weight and bias (no copy, same parameter names), and holds its updates in a tuple
    so that they stay registered in one place only: the owning layer wrapper's ModuleDict.
    """

    def __init__(self, base: nn.Linear, parts: Sequence[tuple[WeightUpdate, slice]]):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a second weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.parts = tuple(parts)
        self.merged = False
        self._unmerged: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            if self.training:
                raise RuntimeError("weight updates are merged; call unmerge() before training")
            return F.linear(x, self.weight, self.bias)
        inner = x
        for update, _ in self.parts:
            if update.scales_input:
                inner = update.adapt_input(inner)
        out = F.linear(inner, self.weight, self.bias)
        for update, rows in self.parts:
            out = update.adapt_output(x, out, rows, self.weight, self.bias)
        return out

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        # Kept so that unmerge restores them bit for bit (W + D - D is not always W in floating point).
        self._unmerged = (self.weight.detach().clone(), None if self.bias is None else self.bias.detach().clone())
        weight = self.weight.float().clone()  # fp32 working copies, whatever the stored precision
        bias = None if self.bias is None else self.bias.float().clone()
        # Input scalings act before the matmul, so they fold into the columns before the rows change.
        for update, rows in sorted(self.parts, key=lambda part: not part[0].scales_input):
            update.merge_into(weight, bias, rows)
        self.weight.copy_(weight.to(self.weight.dtype))
        if bias is not None:
            self.bias.copy_(bias.to(self.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight, bias = self._unmerged
        self.weight.copy_(weight)
        if bias is not None:
            self.bias.copy_(bias)
        self._unmerged = None
        self.merged = False


def rows_of(third: Optional[int], out_features: int) -> slice:
    """Which output rows a target covers: one third of the fused q|k|v projection, or all of it."""
    if third is None:
        return ALL_ROWS
    width = out_features // 3
    return slice(third * width, (third + 1) * width)


class AdaptedGPT2Layer(nn.Module):
    """Wraps a GPT2Layer, freezes it, and installs weight updates on its projections. The forward pass is the
    base layer's: its projections now include the updates. Subclasses keep their updates in a ModuleDict."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer.requires_grad_(False)

    def install(self, parts: Sequence[tuple[str, WeightUpdate, slice]], method: str) -> None:
        """parts: (projection path inside the layer, update, rows)."""
        by_projection = defaultdict(list)
        for path, update, rows in parts:
            by_projection[path].append((update, rows))
        for path, updates in by_projection.items():
            linear = self.layer.get_submodule(path)
            if isinstance(linear, AdaptedLinear):
                raise ValueError(f"{method}: a weight update is already applied to {path} of this layer")
            parent, name = path.rsplit(".", 1)
            setattr(self.layer.get_submodule(parent), name, AdaptedLinear(linear, updates))

    def projections(self) -> list[AdaptedLinear]:
        return [m for m in self.layer.modules() if isinstance(m, AdaptedLinear)]

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


def target_overlap(targets: Sequence[str], choices: dict) -> Optional[str]:
    """The problem when targets overlap (`c_attn`, all of q|k|v, beside query/key/value), else None.
    `choices` maps a target to (projection path, third or None, ...)."""
    fused = [t for t in targets if choices[t][0] == "attn.c_attn" and choices[t][1] is None]
    thirds = [t for t in targets if choices[t][1] is not None]
    if fused and thirds:
        return f"c_attn already covers query, key and value; give c_attn or some of {', '.join(thirds)}, not both"
    return None


def check_targets(targets: Sequence[str], choices: dict, method: str) -> None:
    unknown = sorted(set(targets) - choices.keys())
    if unknown or not targets:
        raise ValueError(f"{method} targets must be among {', '.join(choices)}; got {list(targets)}")
    overlap = target_overlap(targets, choices)
    if overlap:
        raise ValueError(f"{method} targets: {overlap}")
