"""Soft prompts: n trained embeddings before every input (prompt tuning, Lester et al. 2021), or n embeddings
produced by a small trained prompt encoder (P-tuning, Liu et al. 2021), which folds into plain embeddings."""
from __future__ import annotations

import torch
from torch import nn

from modules.virtual_tokens import VirtualTokens, reparametrise

ENCODERS = ("mlp", "lstm")


class SoftPrompt(VirtualTokens):
    """Prompt tuning: the virtual tokens' input embeddings are the parameter `embeddings` (n, d)."""

    def __init__(self, initial: torch.Tensor):
        super().__init__(initial.shape[0])
        self.embeddings = nn.Parameter(initial.detach().float().clone())

    def input_embeddings(self) -> torch.Tensor:
        return self.embeddings


class PromptEncoder(nn.Module):
    """(n, d) -> (n, d). 'mlp': two hidden ReLU layers of width `hidden`; 'lstm': a two-layer bidirectional LSTM
    of `hidden` units per direction read by a ReLU MLP, so that each virtual token depends on all the others."""

    def __init__(self, kind: str, dim: int, hidden: int):
        super().__init__()
        if kind not in ENCODERS:
            raise ValueError(f"prompt encoder must be one of {', '.join(ENCODERS)}, got {kind!r}")
        self.lstm = nn.LSTM(dim, hidden, num_layers=2, bidirectional=True, batch_first=True) if kind == "lstm" else None
        width = 2 * hidden if kind == "lstm" else dim
        layers = [nn.Linear(width, hidden), nn.ReLU()] + ([nn.Linear(hidden, hidden), nn.ReLU()] if kind == "mlp" else [])
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]
        return self.mlp(x)


class EncodedPrompt(VirtualTokens):
    """P-tuning: the input embeddings are `encoder(inputs)`; `inputs` (n, d) and the encoder train. `folded()` is
    the SoftPrompt of the encoder's current output, what an adapter file keeps."""

    def __init__(self, initial: torch.Tensor, kind: str, hidden: int):
        super().__init__(initial.shape[0])
        self.inputs = nn.Parameter(initial.detach().float().clone())
        self.encoder = PromptEncoder(kind, initial.shape[1], hidden)

    def input_embeddings(self) -> torch.Tensor:
        return reparametrise(self.encoder, self.inputs)

    def folded(self) -> SoftPrompt:
        return SoftPrompt(self.input_embeddings())
