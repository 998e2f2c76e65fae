"""Key/value cache for incremental decoding."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer in one preallocated buffer, so a decoding step writes its new
    entries in place instead of concatenating ever-growing tensors.

    `padding_mask` remembers which cached positions hold real tokens, so a batch of left-padded prompts of
    different lengths keeps masking its padding in every later step.
    """

    def __init__(self, n_layer: int, batch_size: int, n_head: int, head_dim: int, max_length: int):
        self.shape = (n_layer, batch_size, n_head, max_length, head_dim)
        self.max_length = max_length
        self.keys: torch.Tensor | None = None  # allocated on first use, in the dtype the layers produce
        self.values: torch.Tensor | None = None
        self.padding_mask: torch.Tensor | None = None
        self.length = 0  # positions filled so far
        self.frozen = False  # see freeze()

    @classmethod
    def for_model(cls, config, batch_size: int, max_length: int) -> "KVCache":
        if max_length > config.n_positions:
            raise ValueError(f"KVCache: max_length {max_length} exceeds the model context ({config.n_positions})")
        return cls(config.n_layer, batch_size, config.n_head, config.head_dim, max_length)

    def extend_padding_mask(self, chunk_mask: torch.Tensor) -> torch.Tensor:
        """Records which positions of the incoming chunk are real; returns the mask of all positions so far."""
        batch, length = chunk_mask.shape
        end = self.length + length
        if end > self.max_length:
            raise ValueError(f"KVCache: {end} positions exceed the cache size ({self.max_length})")
        if self.padding_mask is None:
            self.padding_mask = torch.zeros(batch, self.max_length, dtype=torch.bool, device=chunk_mask.device)
        self.padding_mask[:, self.length:end] = chunk_mask
        return self.padding_mask[:, :end]

    def freeze(self) -> None:
        """Later chunks attend to the cached positions without being stored: `update` returns the cached keys and
        values concatenated with the chunk's. For a chunk that records gradients: written in place into this one
        buffer, each layer's keys would bump the version of the tensors earlier layers saved for backward."""
        self.frozen = True

    def load(self, keys: torch.Tensor, values: torch.Tensor, padding_mask: torch.Tensor) -> "KVCache":
        """Fills this empty cache with the keys and values (n_layer, B, H, T, hd) of T positions computed before,
        `padding_mask` (B, T) marking the real ones, and freezes it (see `freeze`)."""
        self.keys, self.values = keys, values
        self.extend_padding_mask(padding_mask)
        self.length = keys.shape[3]
        self.freeze()
        return self

    def update(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor):
        """Stores this chunk's keys/values (B, H, T, hd) for one layer; returns all cached ones so far."""
        if self.frozen:
            return (torch.cat([self.keys[layer_idx, :, :, :self.length], keys], dim=2),
                    torch.cat([self.values[layer_idx, :, :, :self.length], values], dim=2))
        if self.keys is None:
            self.keys = torch.empty(self.shape, dtype=keys.dtype, device=keys.device)
            self.values = torch.empty(self.shape, dtype=values.dtype, device=values.device)
        end = self.length + keys.shape[2]
        self.keys[layer_idx, :, :, self.length:end] = keys
        self.values[layer_idx, :, :, self.length:end] = values
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, length: int) -> None:
        """Called once every layer has stored the chunk (a frozen cache stored nothing)."""
        if not self.frozen:
            self.length += length
