"""Prefix tuning (Li & Liang 2021; P-tuning v2): trained keys and values of n virtual positions in every layer's
attention. Optionally (peft's `prefix_projection`) they are reparametrised while training as
Linear(tanh(Linear(e))) of n trained embeddings e; `folded()` turns that into the plain keys and values."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from modules.virtual_tokens import VirtualTokens, reparametrise


class KeyValuePrefix(VirtualTokens):
    """`prefix` (len(layers), 2, n_head, n, head_dim): the attention of layers[j] sees keys prefix[j, 0] and values
    prefix[j, 1] before the real tokens'. With `projection` (a hidden width), the parameters are instead `embeddings`
    (n, d) and an MLP d -> projection -> 2 x len(layers) x d. The other layers' attention has no virtual keys: their
    n slots hold zeros and are left out (`keyless_layers`)."""

    def __init__(self, n_layer: int, n_head: int, initial: torch.Tensor, projection: Optional[int] = None,
                 layers: Optional[list[int]] = None):
        """`initial`: (len(layers), 2, n_head, n, head_dim) keys and values to start from; with a projection, (n, d)
        embeddings for its input. `layers`: the layers with a prefix (default all)."""
        super().__init__(initial.shape[3] if projection is None else initial.shape[0])
        self.n_layer, self.n_head = n_layer, n_head
        self.layers = list(range(n_layer)) if layers is None else list(layers)
        self.keyless_layers = frozenset(range(n_layer)) - set(self.layers)
        if projection is None:
            self.prefix = nn.Parameter(initial.detach().float().clone())
            self.projection = None
        else:
            dim = initial.shape[1]
            self.embeddings = nn.Parameter(initial.detach().float().clone())
            self.projection = nn.Sequential(nn.Linear(dim, projection), nn.Tanh(),
                                            nn.Linear(projection, 2 * len(self.layers) * dim))

    def chosen_key_values(self) -> torch.Tensor:
        """(len(layers), 2, n_head, n, head_dim): the chosen layers' keys and values."""
        if self.projection is None:
            return self.prefix
        flat = reparametrise(self.projection, self.embeddings)  # (n, 2 x len(layers) x d): layer by layer, key, value
        return flat.view(self.length, len(self.layers), 2, self.n_head, -1).permute(1, 2, 3, 0, 4)

    def key_values(self) -> torch.Tensor:
        chosen = self.chosen_key_values()
        if not self.keyless_layers:
            return chosen
        every = chosen.new_zeros((self.n_layer,) + chosen.shape[1:])
        return every.index_copy(0, torch.tensor(self.layers, device=chosen.device), chosen)

    def folded(self) -> "KeyValuePrefix":
        if self.projection is None:
            return self  # nothing to fold
        return KeyValuePrefix(self.n_layer, self.n_head, self.chosen_key_values().contiguous(), layers=self.layers)
