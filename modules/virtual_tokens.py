"""Virtual tokens: trained positions before every sequence's real tokens (soft prompts, prefixes).

GPT2Model holds at most one VirtualTokens part and adds its n positions in each sequence's first chunk (the
prefill when generating): `input_embeddings` as n extra input columns that run through every layer (prompt
tuning, P-tuning), or `key_values` as n extra keys and values in every layer's attention (prefix tuning).
Either way they occupy positions 0..n-1 and the real tokens follow at n, n+1, ... (peft's convention: a virtual
token is a token before the text), they are always attended to, never padding and never prompt positions for
interventions, and with a KVCache they are cached like any earlier token.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class VirtualTokens(nn.Module):
    def __init__(self, length: int):
        super().__init__()
        if length < 1:
            raise ValueError(f"the number of virtual tokens must be >= 1, got {length}")
        self.length = length

    def input_embeddings(self) -> Optional[torch.Tensor]:
        """(n, d) fp32 embeddings of the virtual input columns (position embeddings are added as for any
        token), or None when this part adds no input columns."""
        return None

    def key_values(self) -> Optional[torch.Tensor]:
        """(n_layer, 2, n_head, n, head_dim) fp32 keys ([:, 0]) and values ([:, 1]) every layer's attention puts
        before the chunk's own, or None when this part adds none."""
        return None

    # Layers whose attention leaves the virtual keys out (their slots in `key_values` are placeholders).
    keyless_layers: frozenset = frozenset()




def reparametrise(function, x: torch.Tensor) -> torch.Tensor:
    """Runs a training-only reparametrisation (P-tuning's encoder, a prefix projection) on `x` in fp32 and on one
    kernel path whatever autocast and grad mode are active (an LSTM takes another kernel under no_grad), so that
    its folded form (plain fp32 tensors) gives exactly the outputs it gave. It is tiny: n rows."""
    with torch.autocast(device_type=x.device.type, enabled=False), torch.enable_grad():
        out = function(x.float())
    return out if torch.is_grad_enabled() else out.detach()
