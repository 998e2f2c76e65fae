"""The per-batch facts every layer needs, computed once per forward pass instead of once per layer."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from modules.kv_cache import KVCache


@dataclass
class ForwardContext:
    # (B, T) bool, True at real tokens of this chunk; None when no row is padded.
    padding_mask: Optional[torch.Tensor]
    # (B, T) bool, True at prompt tokens: the positions ReFT-style interventions may act on.
    # None means "no prompt tokens in this chunk" (a decoding step).
    prompt_mask: Optional[torch.Tensor]
    # Boolean SDPA mask (B, 1, T, S), True = may attend; None means plain causal (or, for a single new
    # token with no padding anywhere, attend to everything).
    attn_mask: Optional[torch.Tensor]
    is_causal: bool
    cache: Optional["KVCache"] = None
    past_length: int = 0  # keys before this chunk's: cached ones and virtual ones (a prefix's)
    # (n_layer, 2, n_head, n, head_dim): a prefix's keys and values, which every layer's attention puts before
    # this chunk's own (modules/virtual_tokens.py); None when the chunk brings none.
    virtual_key_values: Optional[torch.Tensor] = None
    # The first `virtual_keys` keys of every layer's sequence are virtual; the layers in `keyless_layers` have
    # none of their own there (a prefix on chosen layers only), so their attention leaves those keys out.
    virtual_keys: int = 0
    keyless_layers: frozenset = frozenset()
    # Per-forward memo for derived tensors (e.g. intervention positions), so that twelve layers asking
    # the same question compute the answer once.
    memo: dict = field(default_factory=dict)

    def memoized(self, key, compute):
        if key not in self.memo:
            self.memo[key] = compute()
        return self.memo[key]
