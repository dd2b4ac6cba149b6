"""Which tensor-parallel shard a layer holds.

Layers take a ``ParallelState`` explicitly (no module-global process group). Today every engine is
one rank (``ParallelState()``); the shapes and weight loaders already follow the sharding rules,
so a multi-rank engine only has to build the layers with its own rank and a process group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelState:
    """``tp_rank`` of ``tp_size`` ranks; ``group`` is the ``torch.distributed`` group (None: one rank)."""

    tp_rank: int = 0
    tp_size: int = 1
    group: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tp_size must be a positive integer, got {self.tp_size!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank!r}")
        if self.tp_size > 1 and self.group is None:
            raise ValueError("a tensor-parallel state with tp_size > 1 needs a process group")

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks (in place); the identity on one rank."""
        if self.tp_size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``x`` along the last dimension; the identity on one rank."""
        if self.tp_size == 1:
            return x
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``, refusing sizes that do not split evenly across ranks."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


SINGLE = ParallelState()
