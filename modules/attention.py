"""Causal multi-head self-attention with a padding mask and an optional key/value cache."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modules.context import ForwardContext


class CausalSelfAttention(nn.Module):
    """GPT-2 attention. Module names mirror the checkpoint's (`c_attn` holds q|k|v fused, `c_proj` the output
    projection), so loading is a short mapping and one matmul computes all three projections."""

    def __init__(self, config, layer_idx: int = 0):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.head_dim
        self.n_embd = config.n_embd
        self.layer_idx = layer_idx  # which slot of a shared KVCache belongs to this layer
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)
        # The fused kernel is the default; the plain path spells the math out for readers and is tested equal.
        self.use_sdpa = True

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, hd)

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        batch, length, _ = x.shape
        query, key, value = self.c_attn(x).split(self.n_embd, dim=-1)
        query, key, value = map(self._split_heads, (query, key, value))
        if ctx.virtual_key_values is not None:  # a sequence's first chunk, after a prefix (cached with it)
            prefix = ctx.virtual_key_values[self.layer_idx].to(key.dtype)
            key = torch.cat([prefix[0].expand(batch, -1, -1, -1), key], dim=2)
            value = torch.cat([prefix[1].expand(batch, -1, -1, -1), value], dim=2)
        if ctx.cache is not None:
            key, value = ctx.cache.update(self.layer_idx, key, value)
        attn_mask = ctx.attn_mask
        if self.layer_idx in ctx.keyless_layers:  # the virtual key slots are placeholders in this layer
            skip = ctx.virtual_keys
            key, value = key[:, :, skip:], value[:, :, skip:]
            attn_mask = None if attn_mask is None else attn_mask[..., skip:]

        dropout = self.dropout if self.training else 0.0
        if self.use_sdpa:
            out = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attn_mask, dropout_p=dropout, is_causal=ctx.is_causal
            )
        else:
            out = plain_attention(query, key, value, attn_mask, ctx.is_causal, dropout)
        out = out.transpose(1, 2).reshape(batch, length, self.n_embd)
        return self.resid_dropout(self.c_proj(out))


def plain_attention(query, key, value, attn_mask, is_causal: bool, dropout: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head) + mask) v, written out."""
    scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])
    if is_causal:
        attn_mask = causal_mask(query.shape[-2], key.shape[-2], past_length=0, device=query.device)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    probs = F.dropout(torch.softmax(scores, dim=-1), p=dropout)
    return probs @ value


def causal_mask(query_length: int, key_length: int, past_length: int, device=None) -> torch.Tensor:
    """(T, S) bool: query i (absolute position past_length + i) may attend to keys 0 .. past_length + i."""
    query_pos = torch.arange(past_length, past_length + query_length, device=device)
    return torch.arange(key_length, device=device)[None, :] <= query_pos[:, None]


def build_attention_mask(key_padding: torch.Tensor, query_length: int, past_length: int) -> torch.Tensor:
    """(B, 1, T, S) bool from the padding of all S keys (B, S) and the causal structure.

    Each query may always attend to its own position: a padding query whose every other key is padding
    would otherwise get an all -inf row and NaNs. Its output is never used, but NaNs would leak into
    gradients.
    """
    key_length = key_padding.shape[1]
    causal = causal_mask(query_length, key_length, past_length, key_padding.device)
    self_position = torch.zeros_like(causal)
    rows = torch.arange(query_length, device=causal.device)
    self_position[rows, rows + past_length] = True
    return (causal[None] & key_padding[:, None, :]).logical_or_(self_position[None])[:, None]
