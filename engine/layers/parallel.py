"""Which tensor-parallel shard and which pipeline stage a layer holds.

Layers take a ``ParallelState`` explicitly (no module-global process group). A one-rank engine uses
``SINGLE``; a multi-rank engine (``pageant.engine.distributed``) builds its model with its own
``tp_rank`` / ``pp_rank`` and the tensor-parallel process group of its stage. Pipeline stages split
the decoder layers evenly (earlier stages take the remainder); stage 0 holds the embedding, the
last stage the final norm and the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ParallelState:
    """``tp_rank`` of ``tp_size`` ranks; ``group`` is the ``torch.distributed`` group (None: one rank);
    ``pp_rank`` of ``pp_size`` pipeline stages (0 is the first, embedding, stage)."""

    tp_rank: int = 0
    tp_size: int = 1
    group: Any = None
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.tp_size, int) or self.tp_size < 1:
            raise ValueError(f"tp_size must be a positive integer, got {self.tp_size!r}")
        if not isinstance(self.tp_rank, int) or not 0 <= self.tp_rank < self.tp_size:
            raise ValueError(f"tp_rank must be in [0, {self.tp_size}), got {self.tp_rank!r}")
        if self.tp_size > 1 and self.group is None:
            raise ValueError("a tensor-parallel state with tp_size > 1 needs a process group")
        if not isinstance(self.pp_size, int) or self.pp_size < 1:
            raise ValueError(f"pp_size must be a positive integer, got {self.pp_size!r}")
        if not isinstance(self.pp_rank, int) or not 0 <= self.pp_rank < self.pp_size:
            raise ValueError(f"pp_rank must be in [0, {self.pp_size}), got {self.pp_rank!r}")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layer_range(self, num_layers: int) -> tuple[int, int]:
        """``[start, end)`` of the decoder layers this stage runs."""
        return stage_layers(num_layers, self.pp_size, self.pp_rank)

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


def stage_layers(num_layers: int, pp_size: int, pp_rank: int) -> tuple[int, int]:
    """``[start, end)`` of stage ``pp_rank``'s layers: ``num_layers // pp_size`` each, the first
    ``num_layers % pp_size`` stages one more."""
    if num_layers < pp_size:
        raise ValueError(f"the model has {num_layers} layers, fewer than the pipeline-parallel size {pp_size}")
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def divide(numerator: int, denominator: int, what: str) -> int:
    """``numerator // denominator``, refusing sizes that do not split evenly across ranks."""
    if numerator % denominator:
        raise ValueError(f"{what} ({numerator}) is not divisible by the tensor-parallel size {denominator}")
    return numerator // denominator


SINGLE = ParallelState()


class PPMissingLayer(nn.Module):
    """A placeholder for a layer another pipeline stage holds: no parameters, never called."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a layer of another pipeline stage was called")
