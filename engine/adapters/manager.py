"""The LoRA manager: known adapters, a CPU cache, device slots, and the per-batch delta.

Three tiers, as in vLLM:

- *registered*: every adapter added by name (``add_lora``), with the request that names its path;
  it stays listed until ``remove_lora``.
- *CPU cache*: up to ``max_cpu_loras`` validated adapters in host memory, LRU; an evicted one is
  read again from its path when next needed.
- *device slots*: ``max_loras`` slots in stacked per-layer buffers (``lora_a`` / ``lora_b`` of every
  fused projection group) that the kernels read; LRU, and a slot whose adapter is in the current
  batch is never evicted. A batch may use at most ``max_loras`` distinct adapters (the scheduler
  guarantees it).

Per step the model runner calls ``set_batch(per-sequence adapter names, per-sequence token counts)``;
the model's LoRA-wrapped projections then call ``apply`` (see ``layers.py``). The batch state lives
on this manager object (one per engine), like vLLM's punica wrapper, not in a module global.
Single-threaded, like the engine.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from pageant.engine.adapters.peft_loader import LoRAAdapter, LoRAAdapterError, LoRANotFoundError, load_peft_adapter
from pageant.engine.adapters.sharding import GroupShard
from pageant.engine.adapters.spec import LoRAModelSpec
from pageant.kernels.lora_reference import LoRAKernelMeta


@dataclass(frozen=True)
class LoRABatch:
    """The adapter slot of every token of one step (``-1`` = base model), grouped for the kernels."""

    token_lora_indices: torch.Tensor  # [num_tokens] int32 on the device
    meta: LoRAKernelMeta
    has_lora: bool  # False when every token uses the base model: apply() is then a no-op


def lora_ops(backend: str):
    """The shrink/expand module for an attention backend: "torch" → reference, "triton" → kernels."""
    if backend == "torch":
        from pageant.kernels import lora_reference

        return lora_reference
    if backend == "triton":
        from pageant.kernels import lora

        return lora
    raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'triton'")


class LoRAManager:
    """Adapters by name, cached on the CPU and swapped LRU into ``max_loras`` device slots."""

    def __init__(
        self,
        spec: LoRAModelSpec,
        *,
        max_loras: int,
        max_lora_rank: int,
        max_cpu_loras: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        backend: str = "torch",
        adapter_root: str | pathlib.Path | None = None,
        reserved_names: Iterable[str] = (),
    ):
        if not isinstance(max_loras, int) or max_loras < 1:
            raise ValueError(f"max_loras must be a positive integer, got {max_loras!r}")
        if not isinstance(max_lora_rank, int) or max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be a positive integer, got {max_lora_rank!r}")
        max_cpu_loras = max_loras if max_cpu_loras is None else max_cpu_loras
        if not isinstance(max_cpu_loras, int) or max_cpu_loras < max_loras:
            raise ValueError(f"max_cpu_loras ({max_cpu_loras!r}) must be an integer >= max_loras ({max_loras})")
        self.spec = spec
        self.max_loras, self.max_lora_rank, self.max_cpu_loras = max_loras, max_lora_rank, max_cpu_loras
        self.device, self.dtype = torch.device(device), dtype
        self.ops = lora_ops(backend)
        self.adapter_root = adapter_root
        self.reserved_names = frozenset(reserved_names)
        self._requests: dict[str, tuple[int, str]] = {}  # name -> (int_id, path as given)
        self._cpu: collections.OrderedDict[str, LoRAAdapter] = collections.OrderedDict()
        self._slot_names: list[str | None] = [None] * max_loras
        self._slot_lru: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._running: collections.Counter[str] = collections.Counter()
        self._batch: LoRABatch | None = None
        self.num_swaps_in = 0  # adapters copied into a device slot (for stats and tests)
        self.shards: dict[str, GroupShard] = {}  # tensor parallelism: this rank's share per group
        self._allocate()

    def _allocate(self) -> None:
        spec, r, max_loras, dtype = self.spec, self.max_lora_rank, self.max_loras, self.dtype
        # lora_a[group]: [num_layers, max_loras, num_slices * r, in_features] (slice i at rows i*r..)
        # lora_b[group][i]: [num_layers, max_loras, out_features_i, r]
        self.lora_a: dict[str, torch.Tensor] = {}
        self.lora_b: dict[str, list[torch.Tensor]] = {}
        for group, projs in spec.groups:
            ins = {spec.shape(p)[0] for p in projs}
            if len(ins) != 1:
                raise ValueError(f"projections {projs} of group {group} differ in in_features")
            shard = self.shards.get(group)
            in_features = ins.pop() if shard is None or shard.cols is None else len(shard.cols)
            self.lora_a[group] = torch.zeros(
                spec.num_layers, max_loras, len(projs) * r, in_features, device=self.device, dtype=dtype
            )
            self.lora_b[group] = [
                torch.zeros(spec.num_layers, max_loras,
                            spec.shape(p)[1] if shard is None or shard.rows[i] is None else len(shard.rows[i]), r,
                            device=self.device, dtype=dtype)
                for i, p in enumerate(projs)
            ]

    def set_sharding(self, shards: dict[str, GroupShard]) -> None:
        """Hold only this tensor-parallel rank's share of every group (see ``sharding.py``); call
        before any adapter is in a slot (``wrap_model`` does)."""
        if any(self._slot_names):
            raise RuntimeError("set_sharding must come before adapters are placed in device slots")
        self.shards = dict(shards)
        self._allocate()

    # ---- registry -------------------------------------------------------------------------
    def add_lora(self, name: str, int_id: int, path: str) -> bool:
        """Validate and load the adapter; False if the same adapter is already loaded.

        Raises ``LoRAAdapterError`` for a bad adapter, a name that collides with the base model,
        or a name/id already used by a different adapter.
        """
        if not isinstance(name, str) or not name.strip() or any(c.isspace() or not c.isprintable() for c in name):
            raise LoRAAdapterError(f"invalid LoRA name {name!r}: use a non-empty name without spaces")
        if name in self.reserved_names:
            raise LoRAAdapterError(f"LoRA name {name!r} collides with the base model's name")
        if not isinstance(int_id, int) or isinstance(int_id, bool) or int_id < 1:
            raise LoRAAdapterError(f"lora_int_id must be a positive integer, got {int_id!r}")
        if name in self._requests:
            if self._requests[name] == (int_id, path):
                return False
            raise LoRAAdapterError(
                f"a LoRA adapter named {name!r} is already loaded from another path or id; unload it first"
            )
        for other, (other_id, _) in self._requests.items():
            if other_id == int_id:
                raise LoRAAdapterError(f"lora_int_id {int_id} is already used by adapter {other!r}")
        adapter = self._load(name, int_id, path)
        self._requests[name] = (int_id, path)
        self._cache(adapter)
        return True

    def remove_lora(self, name: str) -> None:
        """Forget the adapter everywhere; refused while requests using it are running or waiting."""
        if name not in self._requests:
            raise LoRANotFoundError(f"LoRA adapter {name!r} is not loaded")
        if self._running[name]:
            raise LoRAAdapterError(
                f"LoRA adapter {name!r} has {self._running[name]} unfinished request(s); "
                "unload it when they are done"
            )
        del self._requests[name]
        self._cpu.pop(name, None)
        slot = self._slot_lru.pop(name, None)
        if slot is not None:
            self._slot_names[slot] = None

    def list_loras(self) -> list[tuple[str, int, str]]:
        """(name, int_id, path) of every registered adapter, in the order they were added."""
        return [(name, int_id, path) for name, (int_id, path) in self._requests.items()]

    def has_lora(self, name: str) -> bool:
        return name in self._requests

    def resident(self) -> list[str]:
        """Names of the adapters now in device slots."""
        return [n for n in self._slot_names if n is not None]

    def cpu_cached(self) -> list[str]:
        return list(self._cpu)

    # ---- requests using adapters ------------------------------------------------------------
    def acquire(self, name: str) -> None:
        """A request for ``name`` entered the engine (``remove_lora`` is refused until release)."""
        if name not in self._requests:
            raise LoRANotFoundError(f"LoRA adapter {name!r} is not loaded")
        self._running[name] += 1

    def release(self, name: str) -> None:
        """A request for ``name`` finished or was aborted."""
        if self._running[name] <= 1:
            self._running.pop(name, None)
        else:
            self._running[name] -= 1

    def num_running(self, name: str) -> int:
        """Unfinished requests (running or waiting) that use ``name``."""
        return self._running.get(name, 0)

    # ---- batches --------------------------------------------------------------------------
    def set_batch(self, seq_lora_names: Sequence[str | None], seq_num_tokens: Sequence[int]) -> LoRABatch:
        """Make this step's adapters resident and record every token's slot (sequences back to back)."""
        if len(seq_lora_names) != len(seq_num_tokens):
            raise ValueError("seq_lora_names and seq_num_tokens differ in length")
        distinct = list(dict.fromkeys(n for n in seq_lora_names if n is not None))
        if len(distinct) > self.max_loras:
            raise ValueError(f"a batch uses {len(distinct)} LoRA adapters, more than max_loras={self.max_loras}")
        slots = self._activate(distinct)
        indices: list[int] = []
        for name, count in zip(seq_lora_names, seq_num_tokens):
            indices.extend([-1 if name is None else slots[name]] * count)
        host = torch.tensor(indices, dtype=torch.int32)  # [num_tokens]
        meta = LoRAKernelMeta.build(host, self.max_loras)
        if self.device.type != "cpu":
            host = host.to(self.device, non_blocking=True)
            meta = dataclasses.replace(
                meta,
                sorted_token_indices=meta.sorted_token_indices.to(self.device, non_blocking=True),
                num_tokens_per_slot=meta.num_tokens_per_slot.to(self.device, non_blocking=True),
                slot_start=meta.slot_start.to(self.device, non_blocking=True),
            )
        self._batch = LoRABatch(token_lora_indices=host, meta=meta, has_lora=bool(distinct))
        return self._batch

    def clear_batch(self) -> None:
        self._batch = None

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Add the LoRA delta of projection ``group`` of ``layer`` to ``out`` in place.

        ``x``: [num_tokens, in_features], the projection's input; ``out``: [num_tokens,
        sum(out_features of the group's slices)], the base projection's output.
        """
        batch = self._batch
        if batch is None or not batch.has_lora:
            return out
        if x.shape[0] != batch.token_lora_indices.shape[0]:
            raise ValueError(
                f"LoRA batch has {batch.token_lora_indices.shape[0]} tokens, the projection got {x.shape[0]}"
            )
        r = self.max_lora_rank
        idx, meta = batch.token_lora_indices, batch.meta
        y = self.ops.lora_shrink(x, self.lora_a[group][layer], idx, 1.0, meta=meta)  # [num_tokens, slices * r]
        offset = 0
        for i, b in enumerate(self.lora_b[group]):
            self.ops.lora_expand(y[:, i * r : (i + 1) * r], b[layer], idx, out, True, offset=offset, meta=meta)
            offset += b.shape[2]
        return out

    # ---- internals ------------------------------------------------------------------------
    def _load(self, name: str, int_id: int, path: str) -> LoRAAdapter:
        return load_peft_adapter(
            name, int_id, path, self.spec, max_lora_rank=self.max_lora_rank, adapter_root=self.adapter_root
        )

    def _cache(self, adapter: LoRAAdapter) -> None:
        self._cpu[adapter.name] = adapter
        self._cpu.move_to_end(adapter.name)
        while len(self._cpu) > self.max_cpu_loras:
            self._cpu.popitem(last=False)  # read again from its path when next needed

    def _adapter(self, name: str) -> LoRAAdapter:
        if name not in self._requests:
            raise LoRANotFoundError(f"LoRA adapter {name!r} is not loaded")
        adapter = self._cpu.get(name)
        if adapter is None:
            int_id, path = self._requests[name]
            adapter = self._load(name, int_id, path)
        self._cache(adapter)
        return adapter

    def _activate(self, names: list[str]) -> dict[str, int]:
        """Slots for ``names`` (at most max_loras), loading the missing ones into LRU slots."""
        needed = set(names)
        slots: dict[str, int] = {}
        for name in names:
            if name in self._slot_lru:
                self._slot_lru.move_to_end(name)
                slots[name] = self._slot_lru[name]
        for name in names:
            if name in slots:
                continue
            adapter = self._adapter(name)
            if None in self._slot_names:
                slot = self._slot_names.index(None)
            else:
                victim = next(n for n in self._slot_lru if n not in needed)
                slot = self._slot_lru.pop(victim)
            self._write_slot(slot, adapter)
            self._slot_names[slot] = name
            self._slot_lru[name] = slot
            slots[name] = slot
            self.num_swaps_in += 1
        return slots

    @torch.no_grad()
    def _write_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        r = self.max_lora_rank
        for group, projs in self.spec.groups:
            a = self.lora_a[group]
            a[:, slot].zero_()
            for i, proj in enumerate(projs):
                b = self.lora_b[group][i]
                b[:, slot].zero_()
                for layer in range(self.spec.num_layers):
                    w = adapter.weights.get((layer, proj))
                    if w is None:
                        continue
                    lora_a, lora_b = w  # [rank, in], [out, rank]
                    shard = self.shards.get(group)
                    if shard is not None:  # this rank's columns of A / rows of B
                        if shard.cols is not None:
                            lora_a = lora_a[:, shard.cols]
                        if shard.rows[i] is not None:
                            lora_b = lora_b[shard.rows[i]]
                    rank = lora_a.shape[0]
                    a[layer, slot, i * r : i * r + rank].copy_(lora_a)
                    b[layer, slot, :, :rank].copy_(lora_b)
