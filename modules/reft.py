"""Representation fine-tuning: small trained edits of hidden states inside a frozen GPT2Layer.

One intervention class covers pyreft's whole family through three flags instead of near-copies:

    h + scale * R^T (act(W h + b) - R h)   orthonormal R                 -> LoReFT (Wu et al., 2024)
                                           free R                        -> NoReFT
    h + scale * R^T (b - R h)              orthonormal R, constant source -> ConsReFT
    h + scale * R^T  act(W h + b)          orthonormal R                 -> DiReFT (pyreft's meaning)
                                           free R                        -> NodiReFT (the paper's DiReFT), and
                                                                            the adapter form up(act(down h)) of "reft"
    h + scale * R^T  b                     orthonormal R, constant source -> LobiReFT

W h + b (or the constant b) is `source` (d -> r) and R^T is the map back up (r -> d). Every variant starts as the
identity except ConsReFT, which replaces h's component in R's subspace by b and so cannot: with the subtraction,
W starts equal to R and b at zero; without it, the source starts at zero (orthonormal R) or R does (free R).
"""
from __future__ import annotations

import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from modules.context import ForwardContext

ACTIVATIONS = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "gelu": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh,
}
COMPONENTS = ("attention", "ffn")
POSITIONS_RULE = "must be 'all' or like 'f1+l1', 'l3', 'f2+l2' (first/last k prompt tokens)"


# An R whose rows are orthonormal to within this (fp32 rounding of R R^T is about 1e-6 at d = 768..1600) is used
# exactly as it is; anything further from orthonormal is orthonormalised.
ORTHONORMAL_TOLERANCE = 1e-5


def orthonormal_rows(raw: torch.Tensor) -> torch.Tensor:
    """raw (r x d) -> R (r x d) with orthonormal rows spanning raw's rows, differentiable (fp32 in, fp32 out).

    QR is unique only up to the signs of Q's columns: they are fixed so that the triangular factor has a positive
    diagonal, which maps an orthonormal `raw` to itself up to rounding. Within ORTHONORMAL_TOLERANCE `raw` is
    returned bitwise as it is (with the QR's gradient), so that an R given from outside (pyreft's, or one saved in
    another format) computes exactly what it computed there.
    """
    q, triangular = torch.linalg.qr(raw.t())  # (d, r) with orthonormal columns
    q = (q * torch.where(triangular.diagonal() < 0, -1.0, 1.0)).t()
    eye = torch.eye(raw.shape[0], dtype=raw.dtype, device=raw.device)
    already = (raw @ raw.t() - eye).abs().amax() <= ORTHONORMAL_TOLERANCE
    return torch.where(already, raw.detach() + (q - q.detach()), q)  # no host sync: both are computed


def legacy_orthonormal_rows(raw: torch.Tensor) -> torch.Tensor:
    """The orthonormalisation of adapter format version 1: plain QR, whose column signs LAPACK chooses."""
    return torch.linalg.qr(raw.float().t())[0].t()


class ConstantSource(nn.Module):
    """The source of ConsReFT and LobiReFT: a trained vector b (r), the same for every h."""

    def __init__(self, rank: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(rank))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.bias.float().expand(*h.shape[:-1], -1)


class LowRankIntervention(nn.Module):
    def __init__(self, dim: int, rank: int, orthogonal: bool, subtract_projection: bool, linear_source: bool = True,
                 activation: str = "identity", dropout: float = 0.0, scale: float = 1.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if rank > dim:
            raise ValueError(f"intervention rank {rank} exceeds the hidden size {dim}")
        self.orthogonal = orthogonal
        self.subtract_projection = subtract_projection
        self.scale = scale
        self.source = nn.Linear(dim, rank) if linear_source else ConstantSource(rank)
        self.activation = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout)
        # R, stored raw; with `orthogonal` the rows actually used are orthonormal_rows(this parameter). Saving the
        # raw fp32 parameter therefore reproduces R exactly on reload.
        self.rotate = nn.Parameter(torch.zeros(rank, dim))
        with torch.no_grad():
            if orthogonal or subtract_projection:
                nn.init.orthogonal_(self.rotate)
            if subtract_projection and linear_source:
                self.source.weight.copy_(self.projection())
                self.source.bias.zero_()
            elif orthogonal and not subtract_projection:  # DiReFT, LobiReFT: a zero source is the identity
                for param in self.source.parameters():
                    param.zero_()

    def projection(self) -> torch.Tensor:
        """R (r x d), in fp32; orthonormal rows when the intervention is orthogonal."""
        rotate = self.rotate.float()
        return orthonormal_rows(rotate) if self.orthogonal else rotate

    def upgrade_saved(self, version: int) -> None:
        """Makes parameters loaded from an adapter of an older format version compute what they computed then
        (models/peft.py calls this after loading). Version 1 orthonormalised R by plain QR, whose column signs
        differ from today's: storing the R it used, which is orthonormal, makes today's projection use it as is."""
        if version < 2 and self.orthogonal:
            with torch.no_grad():
                self.rotate.copy_(legacy_orthonormal_rows(self.rotate))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h (..., d) -> the edited h, computed in fp32 whatever autocast is active."""
        with torch.autocast(device_type=h.device.type, enabled=False):
            h32 = h.float()
            rotate = self.projection()
            if isinstance(self.source, nn.Linear):
                source = F.linear(h32, self.source.weight.float(), self.source.bias.float())
            else:
                source = self.source(h32)
            z = self.dropout(self.activation(source))
            if self.subtract_projection:
                z = z - h32 @ rotate.t()
            return (h32 + self.scale * (z @ rotate)).to(h.dtype)


def parse_positions(spec: str) -> Optional[list[tuple[str, int]]]:
    """'all' -> None (every token, every step); 'f2+l1' -> [('f', 0), ('f', 1), ('l', 0)]: the first two
    and the last prompt token (first slots first, then last slots)."""
    if spec == "all":
        return None
    slots = {"f": 0, "l": 0}
    for part in spec.split("+"):
        match = re.fullmatch(r"([fl])(\d+)", part)
        if not match or int(match.group(2)) < 1 or slots[match.group(1)]:
            raise ValueError(f"positions {POSITIONS_RULE}; got {spec!r}")
        slots[match.group(1)] = int(match.group(2))
    return [("f", i) for i in range(slots["f"])] + [("l", i) for i in range(slots["l"])]


def select_positions(prompt_mask: torch.Tensor, slots: list[tuple[str, int]]):
    """For each row, the time index of each slot among that row's prompt tokens, wherever its padding is.

    Returns (index (B, P) long, valid (B, P) bool). A slot is invalid when the prompt is too short for it,
    or when an earlier slot already picked the same token (a one-token prompt under 'f1+l1'), so that no
    token is edited twice.
    """
    rank = prompt_mask.long().cumsum(-1)  # 1-based rank of each prompt token, counted left to right
    count = rank[:, -1:]
    wanted = torch.cat([torch.full_like(count, i + 1) if side == "f" else count - i for side, i in slots], dim=1)
    match = (rank[:, None, :] == wanted[:, :, None]) & prompt_mask[:, None, :]  # (B, P, T)
    valid = match.any(-1)
    index = match.to(torch.int8).argmax(-1)
    for p in range(1, len(slots)):
        repeated = ((index[:, :p] == index[:, p:p + 1]) & valid[:, :p]).any(-1)
        valid[:, p] &= ~repeated
    return index, valid


class PositionedIntervention(nn.Module):
    """One adapter's intervention at one sublayer: LowRankInterventions applied at chosen token positions.

    With `positions='all'` it edits every token of every forward pass, decoding steps included (a change to
    the layer, like LoRA). Otherwise it edits the first/last prompt tokens, which exist only in the prompt's
    forward pass (the prefill when generating), with one shared intervention (tied) or one per slot.
    """

    def __init__(self, dim: int, rank: int, positions: str, tie_positions: bool, **intervention_options):
        super().__init__()
        self.positions = positions
        self.slots = parse_positions(positions)
        count = 1 if self.slots is None or tie_positions else len(self.slots)
        self.interventions = nn.ModuleList(
            LowRankIntervention(dim, rank, **intervention_options) for _ in range(count)
        )

    @property
    def suffix_reach(self) -> Optional[int]:
        """k when this module edits only each row's last k prompt tokens ('l1', 'l3', ...), so that its parameters
        cannot affect any token before them; None when it edits others too. GPT2Model's gradient-free prefix
        (`trainable_suffix_length`) reads this from any module that declares it."""
        if self.slots is None or any(side != "l" for side, _ in self.slots):
            return None
        return len(self.slots)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        if self.slots is None:
            return self.interventions[0](h)
        if ctx.prompt_mask is None:
            return h  # a decoding step: no prompt tokens here
        index, valid = ctx.memoized(("reft-positions", self.positions), lambda: select_positions(ctx.prompt_mask, self.slots))
        rows = torch.arange(h.shape[0], device=h.device)[:, None].expand_as(index)
        if len(self.interventions) == 1:
            edited = self.interventions[0](h[rows[valid], index[valid]])
            return h.index_put((rows[valid], index[valid]), edited)
        for slot, intervention in enumerate(self.interventions):
            chosen = valid[:, slot]
            picked_rows, picked_times = rows[chosen, slot], index[chosen, slot]
            h = h.index_put((picked_rows, picked_times), intervention(h[picked_rows, picked_times]))
        return h


class ReFTGPT2Layer(nn.Module):
    """Wraps a GPT2Layer, freezes it, and applies interventions after its attention sublayer and/or its
    FFN sublayer (the block's output). `self.interventions` is a ModuleDict keyed 'attention' / 'ffn'; each
    holds the interventions of every adapter applied to this layer, by adapter name, run in order."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer.requires_grad_(False)
        self.interventions = nn.ModuleDict({component: nn.ModuleDict() for component in COMPONENTS})

    def add(self, component: str, name: str, intervention: PositionedIntervention) -> None:
        if component not in COMPONENTS:
            raise ValueError(f"ReFT component must be one of {COMPONENTS}, got {component!r}")
        if name in self.interventions[component]:
            raise ValueError(f"an adapter named {name!r} already intervenes at {component} of this layer")
        self.interventions[component][name] = intervention

    def forward(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.layer.attention_block(x, ctx)
        for intervention in self.interventions["attention"].values():
            h = intervention(h, ctx)
        h = self.layer.ffn_block(h)
        for intervention in self.interventions["ffn"].values():
            h = intervention(h, ctx)
        return h
