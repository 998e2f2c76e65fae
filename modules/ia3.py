"""(IA)^3 (Liu et al., 2022): learned vectors that rescale chosen activations of a frozen GPT2Layer, initialised
to ones so that a freshly wrapped layer computes exactly what the base layer does.

The paper's targets are the attention keys and values (`key`, `value`: their thirds of the fused q|k|v output,
bias included) and the FFN's inner activation (`ffn`: the GELU output, i.e. the input of `mlp.c_proj`).
peft's GPT-2 default scales the whole fused `c_attn` output instead of k and v (`c_attn`, 3d) beside `ffn`.
A scaled output folds into W's rows and the bias, a scaled input into W's columns, so (IA)^3 merges like LoRA.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from modules.adapted_linear import AdaptedGPT2Layer, WeightUpdate, check_targets, rows_of

# target -> (projection inside GPT2Layer, which third of its output or None, whether its input is scaled)
IA3_TARGETS = {
    "query": ("attn.c_attn", 0, False),
    "key": ("attn.c_attn", 1, False),
    "value": ("attn.c_attn", 2, False),
    "c_attn": ("attn.c_attn", None, False),
    "ffn": ("mlp.c_proj", None, True),
}


class OutputScale(WeightUpdate):
    """out[rows] * l: the projection's output features (bias included) on its rows, rescaled."""

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def adapt_output(self, x, out, rows, weight, bias):
        if rows.start is None:
            return (out * self.scale).to(out.dtype)
        full = torch.ones(out.shape[-1], device=out.device, dtype=self.scale.dtype)
        return (out * full.slice_scatter(self.scale, start=rows.start, end=rows.stop)).to(out.dtype)

    def merge_into(self, weight, bias, rows) -> None:
        weight[rows] *= self.scale.float()[:, None]
        if bias is not None:
            bias[rows] *= self.scale.float()


class InputScale(WeightUpdate):
    """W (l * x) + b: the projection's input features rescaled (for mlp.c_proj, the FFN's inner activation)."""

    scales_input = True

    def __init__(self, width: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))

    def adapt_input(self, x):
        return (x * self.scale).to(x.dtype)

    def merge_into(self, weight, bias, rows) -> None:
        weight *= self.scale.float()[None, :]


class IA3GPT2Layer(AdaptedGPT2Layer):
    """Wraps a GPT2Layer, freezes it, and adds (IA)^3 vectors, in `self.ia3` keyed by target."""

    def __init__(self, layer: nn.Module, targets: Sequence[str]):
        super().__init__(layer)
        check_targets(targets, IA3_TARGETS, "(IA)^3")
        self.ia3 = nn.ModuleDict()
        parts = []
        for target in targets:
            path, third, scales_input = IA3_TARGETS[target]
            linear = layer.get_submodule(path)
            rows = rows_of(third, linear.out_features)
            width = linear.in_features if scales_input else linear.weight[rows].shape[0]
            self.ia3[target] = InputScale(width) if scales_input else OutputScale(width)
            parts.append((path, self.ia3[target], rows))
        self.install(parts, "(IA)^3")
