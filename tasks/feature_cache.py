"""The frozen part of GPT-2, computed once per example and reused in later epochs and in evaluation.

Below the first layer that holds a trainable parameter (`GPT2Model.frozen_boundary`) nothing changes during
training, so, with dropout off there, the hidden states entering that layer are the same every epoch:

- nothing in GPT-2 trains (a head on the last token): the final last-token features, one vector an example, so
  that an epoch costs the head alone;
- a method confined to upper layers (`--layers 8,9,10,11`): the hidden states entering the first adapted
  layer, every position, stored in the compute precision (bf16 under `--precision bf16`);
- a method acting on each row's last k prompt tokens only (`--positions l1`): the keys and values of the tokens
  before them (the gradient-free prefix of `GPT2Model.forward_trainable_suffix`), in every layer from the
  boundary up, and the hidden states the last k tokens enter the boundary with; evaluation then takes the same
  prefix/suffix split;
- anything else training in layer 0 or in the embeddings (or around the layers, such as virtual tokens): no
  cache.

Entries are keyed by what determines them, each row's real tokens (and prompt mask), so training and
evaluation batches of any composition and padding find them. They live in RAM up to a budget
(`--cache-memory`) and beyond it in a memory-mapped anonymous file in the run directory, which vanishes with
the process. The trainer attaches the cache (`attach`) and prints what it holds (`FrozenCache.describe`).
"""
from __future__ import annotations

import mmap
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from modules.kv_cache import KVCache

SPILL_CHUNK = 256 * 2**20  # the spill file grows by this much at a time
DISK_RESERVE = 2**30  # the spill file stops growing when less than this would be left on its disk
SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> int:
    """'4G', '512M', '1.5g', '0' or a byte count -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", text.lower())
    if not match:
        raise ValueError(f"must be a size such as 4G, 512M or 0, got {text!r}")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2)])


def default_memory_budget() -> int:
    """A quarter of the machine's physical memory (2 GiB where that cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):
        return 2 * 2**30


def format_bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


class TensorStore:
    """CPU tensors by key: in RAM while they fit `memory_budget` bytes, then in a memory-mapped file in `directory`
    (an unnamed temporary file: nothing is left behind, whatever ends the process). `put` returns False, storing
    nothing, once the file would leave less than DISK_RESERVE free on its disk."""

    def __init__(self, memory_budget: int, directory: Path):
        self.memory_budget, self.directory = memory_budget, Path(directory)
        self.ram: dict[bytes, torch.Tensor] = {}
        self.spilled: dict[bytes, tuple[int, torch.Size, torch.dtype]] = {}
        self.ram_bytes = self.disk_bytes = 0
        self.file = None
        self.map: Optional[mmap.mmap] = None
        self.full = False

    def __contains__(self, key: bytes) -> bool:
        return key in self.ram or key in self.spilled

    def __len__(self) -> int:
        return len(self.ram) + len(self.spilled)

    def put(self, key: bytes, tensor: torch.Tensor) -> bool:
        tensor = tensor.detach()
        size = tensor.numel() * tensor.element_size()
        if self.ram_bytes + size <= self.memory_budget:
            self.ram[key] = tensor.to("cpu", copy=True)  # not a view of the batch it came from
            self.ram_bytes += size
            return True
        if not self._room_on_disk(size):
            self.full = True
            return False
        self._bytes_at(self.disk_bytes, size).copy_(tensor.to("cpu").contiguous().view(-1).view(torch.uint8))
        self.spilled[key] = (self.disk_bytes, tensor.shape, tensor.dtype)
        self.disk_bytes += size
        return True

    def get(self, key: bytes) -> torch.Tensor:
        """The stored tensor (a view of the file for a spilled one: copy it before the store closes)."""
        if key in self.ram:
            return self.ram[key]
        offset, shape, dtype = self.spilled[key]
        size = shape.numel() * torch.empty((), dtype=dtype).element_size()
        return self._bytes_at(offset, size).view(dtype).view(shape)

    def close(self) -> None:
        self.ram.clear()
        self.spilled.clear()
        self.map = None  # views still alive keep the mapping until they go
        if self.file is not None:
            self.file.close()
            self.file = None

    def _room_on_disk(self, size: int) -> bool:
        """Makes the mapped file hold `size` more bytes, growing it by SPILL_CHUNK at least; False when that would
        leave less than DISK_RESERVE on its disk."""
        mapped = len(self.map) if self.map is not None else 0
        if self.disk_bytes + size <= mapped:
            return True
        grow = max(SPILL_CHUNK, self.disk_bytes + size - mapped)
        if shutil.disk_usage(self.directory).free - grow < DISK_RESERVE:
            return False
        if self.file is None:
            self.file = tempfile.TemporaryFile(dir=self.directory, prefix="feature-cache-")
        os.ftruncate(self.file.fileno(), mapped + grow)
        self.map = mmap.mmap(self.file.fileno(), mapped + grow)  # the old map goes with its last view
        return True

    def _bytes_at(self, offset: int, size: int) -> torch.Tensor:
        return torch.frombuffer(self.map, dtype=torch.uint8, count=size, offset=offset)


class FrozenCache:
    """What `GPT2Model.frozen_cache` expects; each question returns None for what this cache does not serve, and
    the model then computes as usual:

    - `entering`: the hidden states entering layer `boundary` (1 <= boundary <= n_layer), for every position;
    - `last_token`: the final last-token features, when nothing in GPT-2 trains (boundary n_layer + 1);
    - `prefix`: for a model whose trainable parameters act on each row's last k prompt tokens only
      (`suffix_mode`), the keys and values of the tokens before them and the hidden states the last k start from.

    An entry is rounded to `dtype` (hidden states) when stored, and every use reads the stored value, so the first
    epoch and the later ones (and a resumed run) see the same numbers."""

    def __init__(self, boundary: int, n_layer: int, store: TensorStore, dtype: torch.dtype, suffix_mode: bool):
        self.boundary, self.n_layer, self.store, self.dtype = boundary, n_layer, store, dtype
        self.suffix_mode = suffix_mode
        self.storing = True  # False: what is missing is computed and used, not kept (the run's last predictions)
        self.complete: set[bytes] = set()  # rows whose every part is stored
        self.compute_seconds = 0.0
        self.computed_tokens = self.reused_tokens = 0
        self.uncached_rows = 0  # rows computed but not stored (the store was full)

    @property
    def features_only(self) -> bool:
        return self.boundary > self.n_layer

    # ---- the questions GPT2Model asks
    def entering(self, gpt, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                 prompt_mask: Optional[torch.Tensor]) -> Optional[tuple[int, torch.Tensor]]:
        if not 0 < self.boundary <= self.n_layer:
            return None
        real = real_mask(input_ids, attention_mask)
        prompt = real if prompt_mask is None else prompt_mask.bool()
        keys = [row_key(b"h", input_ids[i][real[i]], prompt[i][real[i]]) for i in range(input_ids.shape[0])]

        def compute():
            return gpt.hidden_states_entering(input_ids, attention_mask, prompt_mask, self.boundary)

        rows = self._lookup(keys, real.sum(-1).tolist(), compute,
                            lambda out, i: {b"h": out[i][real[i]].to(self.dtype)})
        hidden = torch.zeros(*input_ids.shape, gpt.config.n_embd)  # assembled on the CPU; padding: zeros
        for i, (row, where) in enumerate(zip(rows, real.cpu())):
            hidden[i, where] = row[b"h"].to("cpu", hidden.dtype)
        return self.boundary, hidden.to(input_ids.device)

    def last_token(self, gpt, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if not self.features_only:
            return None
        real = real_mask(input_ids, attention_mask)
        keys = [row_key(b"f", input_ids[i][real[i]]) for i in range(input_ids.shape[0])]
        rows = self._lookup(keys, real.sum(-1).tolist(), lambda: gpt.forward(input_ids, attention_mask)["last_token"],
                            lambda out, i: {b"f": out[i].float()})
        return torch.stack([row[b"f"] for row in rows]).to(input_ids.device)

    def prefix(self, gpt, input_ids: torch.Tensor, mask: torch.Tensor, split: int):
        """What `GPT2Model.gradient_free_prefix` returns for these left-aligned rows, from the store."""
        if not self.suffix_mode:
            return None
        real = mask.bool()
        batch, length = input_ids.shape
        counts = real.sum(-1).tolist()
        before = [max(n - (length - split), 0) for n in counts]  # each row's real tokens before the last k
        start = max(self.boundary, 0)
        keys = [row_key(b"p%d|" % (length - split), input_ids[i][real[i]]) for i in range(batch)]

        def extract(out, i):
            cache, entering = out
            span = slice(split - before[i], split)
            parts = {b"kv": torch.stack((cache.keys[start:, i, :, span], cache.values[start:, i, :, span]), 1)}
            if entering is not None:
                parts[b"h"] = entering[1][i].to(self.dtype)
            return parts

        rows = self._lookup(keys, before, lambda: gpt.gradient_free_prefix(input_ids, mask, split), extract)
        sample = rows[0][b"kv"]
        shape = (self.n_layer, batch, sample.shape[2], split, sample.shape[4])
        keys_out = torch.empty(shape, dtype=sample.dtype)  # assembled on the CPU, moved once
        values_out = torch.empty_like(keys_out)
        keys_out[start:].zero_()  # padding: zeros (layers below `start` are never read)
        values_out[start:].zero_()
        for i, row in enumerate(rows):
            span = slice(split - before[i], split)
            keys_out[start:, i, :, span] = row[b"kv"][:, 0]
            values_out[start:, i, :, span] = row[b"kv"][:, 1]
        device = input_ids.device
        cache = KVCache.for_model(gpt.config, batch, length).load(keys_out.to(device), values_out.to(device),
                                                                   real[:, :split])
        if start == 0:
            return cache, None
        hidden = torch.stack([row[b"h"] for row in rows]).to(input_ids.device, torch.float32)
        return cache, (start, hidden)

    def _lookup(self, keys: list[bytes], sizes: list[int], compute: Callable[[], object],
                extract: Callable[[object, int], dict]) -> list[dict]:
        """Each row's stored parts ({name: tensor}). When any row is missing, `compute()` runs for the whole batch
        (without gradients) and `extract(output, i)` gives row i's parts, which are stored."""
        hits = [key in self.complete for key in keys]
        unstored = {}
        if not all(hits):
            begin = time.perf_counter()
            with torch.no_grad():
                output = compute()
            for i, key in enumerate(keys):
                if key in self.complete or key in unstored:
                    continue
                parts = extract(output, i)
                if self.storing and all(self.store.put(key + b"/" + name, part) for name, part in parts.items()):
                    self.complete.add(key)
                else:
                    unstored[key] = parts
                    self.uncached_rows += self.storing
                self.computed_tokens += sizes[i]
            self.compute_seconds += time.perf_counter() - begin
        self.reused_tokens += sum(n for n, hit in zip(sizes, hits) if hit)
        return [unstored[key] if key in unstored else self._parts(key) for key in keys]

    def _parts(self, key: bytes) -> dict:
        prefix = key + b"/"
        return {name: self.store.get(prefix + name) for name in (b"h", b"f", b"kv") if prefix + name in self.store}

    # ---- what the run prints
    def what(self) -> str:
        if self.features_only:
            return "the last-token features (nothing in GPT-2 trains)"
        parts = []
        if self.suffix_mode:
            parts.append("the keys and values of the tokens before the last trained positions (the gradient-free "
                         "prefix)")
        if self.boundary == self.n_layer:
            parts.append(f"the hidden states entering the final LayerNorm (layers 0-{self.n_layer - 1} frozen)")
        elif self.boundary > 0:
            below = "layer 0" if self.boundary == 1 else f"layers 0-{self.boundary - 1}"
            parts.append(f"the hidden states entering layer {self.boundary} ({below} frozen)")
        return " and ".join(parts)

    def describe(self) -> str:
        store = self.store
        if not self.complete and not self.uncached_rows:
            return "  cache: nothing stored (this task's training never asked for the frozen part)"
        seconds_per_token = self.compute_seconds / max(self.computed_tokens, 1)
        full = (f"; the store is full, {self.uncached_rows} rows were computed without being kept (raise "
                "--cache-memory or free disk space)") if store.full else ""
        return (f"  cache: {len(self.complete):,} rows, {format_bytes(store.ram_bytes)} in RAM + "
                f"{format_bytes(store.disk_bytes)} on disk; computing them took {self.compute_seconds:.1f} s, "
                f"reusing them saved ~{self.reused_tokens * seconds_per_token:.1f} s so far{full}")

    def stats(self) -> dict:
        return {"boundary": self.boundary, "suffix_mode": self.suffix_mode, "rows": len(self.complete),
                "ram_bytes": self.store.ram_bytes, "disk_bytes": self.store.disk_bytes,
                "compute_seconds": self.compute_seconds, "computed_tokens": self.computed_tokens,
                "reused_tokens": self.reused_tokens}

    def close(self) -> None:
        self.complete.clear()
        self.store.close()


def real_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()


def row_key(kind: bytes, *parts: torch.Tensor) -> bytes:
    """What determines a row's entry: its real tokens (and, for hidden states, which of them are prompt tokens,
    since a frozen intervention below the boundary may act on those)."""
    return kind + b"|".join(part.to("cpu", torch.int64).numpy().tobytes() for part in parts)


def attach(model: nn.Module, gpt, enabled: bool, memory_budget: Optional[int], directory: Path,
           say: Callable[[str], None]) -> Optional[FrozenCache]:
    """Attaches a cache of the frozen part to `gpt` (inside the task model `model`) and applies its dropout rule:
    none below the boundary, GPT-2's rate on the head's input (a task model that has a head says so with
    `set_head_dropout`). Returns None, changing nothing, when disabled or when nothing below a trainable
    parameter is worth storing (layer 0 or the embeddings train)."""
    boundary, suffix_mode = gpt.frozen_boundary(), gpt.trainable_suffix_length() is not None
    # Virtual tokens (a soft prompt, a prefix) put positions before every row that the stored entries, keyed and
    # laid out by the real tokens, do not hold: no cache, even when they are frozen.
    if not enabled or gpt.virtual_length or (boundary == 0 and not suffix_mode):
        return None
    gpt.set_dropout_below(boundary)
    gpt.prefix_cacheable = suffix_mode
    set_head_dropout = getattr(model, "set_head_dropout", None)
    if set_head_dropout is not None:
        set_head_dropout(gpt.config.dropout)
    budget = default_memory_budget() if memory_budget is None else memory_budget
    dtype = torch.float32 if boundary > gpt.config.n_layer or gpt.precision == "fp32" else torch.bfloat16
    cache = FrozenCache(boundary, gpt.config.n_layer, TensorStore(budget, directory), dtype, suffix_mode)
    gpt.frozen_cache = cache
    where = "in GPT-2" if cache.features_only else " and ".join(
        (["in the gradient-free prefix"] if suffix_mode else []) + ([f"below layer {boundary}"] if boundary else []))
    head = ", on at the head's input" if set_head_dropout is not None else ""
    say(f"  cache: {cache.what()}, computed once per example and reused (in RAM up to {format_bytes(budget)}, "
        f"then on disk); dropout off {where}{head}; --no-cache recomputes them every epoch, with dropout")
    return cache


def detach(gpt, cache: Optional[FrozenCache]) -> None:
    if cache is not None:
        gpt.frozen_cache = None
        cache.close()
