"""Training on several processes (`torchrun --nproc-per-node N train_*.py ...`): DistributedDataParallel with
NCCL on GPUs and gloo on CPUs.

Every rank builds the same global batches from the same seed and takes its share, `batch[rank::world_size]`;
the trainer scales each rank's summed loss so that DDP's gradient average equals the single-process gradient
of the whole global batch. Evaluation is sharded the same way and gathered, so every rank computes the same
metrics and takes the same decisions (best checkpoint, early stopping) without extra messages. Only rank 0
writes files and prints. Resuming reads the checkpoint on every rank, so the output directory must be on a
filesystem all ranks see (always true on one machine).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from models.gpt2 import resolve_device

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of a global batch or of an evaluation set."""
        return list(items[self.rank::self.world_size])

    def gather(self, local: list[T]) -> list[T]:
        """Inverse of `shard`: every rank's share, back in the original order, on every rank."""
        if not self.enabled:
            return list(local)
        shares: list = [None] * self.world_size
        dist.all_gather_object(shares, local)
        return interleave(shares)

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if not self.enabled:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, module: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel around `module` (which computes the loss) when running on several ranks."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)


def interleave(shares: list[list[T]]) -> list[T]:
    """Rank r's share holds items r, r + W, r + 2W, ...: put them back in order."""
    total = sum(len(share) for share in shares)
    return [shares[i % len(shares)][i // len(shares)] for i in range(total)]


def setup_distributed(device: str) -> tuple[Distributed, torch.device]:
    """Joins the process group torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_*);
    a plain run is a world of one. Under torchrun, --device cuda means this rank's GPU (cuda:LOCAL_RANK)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), resolve_device(device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        resolved = torch.device("cuda", local_rank)
        torch.cuda.set_device(resolved)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank), resolved


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
