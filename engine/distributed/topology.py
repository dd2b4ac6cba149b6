"""Ranks, shards and stages, and the checks that a model splits over them.

Global rank ``r`` of ``tp_size * pp_size`` is tensor shard ``r % tp_size`` of pipeline stage
``pp_size - 1 - r // tp_size``: ranks ``[0, tp_size)`` form the *last* stage, so rank 0 (the driver,
in the engine's process, on node 0) holds the LM head and samples, and ranks ``[tp_size, 2 tp_size)``
the stage before it. Each node runs ``world_size // nnodes`` consecutive ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from pageant.engine.config import ModelConfig
from pageant.engine.layers.parallel import stage_layers


@dataclass(frozen=True)
class RankInfo:
    """Where one rank sits."""

    rank: int
    world_size: int
    tp_size: int
    pp_size: int
    nnodes: int = 1

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.pp_size - 1 - self.rank // self.tp_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def local_rank(self) -> int:
        return self.rank % self.ranks_per_node

    def stage_ranks(self, pp_rank: int) -> list[int]:
        """The global ranks of stage ``pp_rank``, by tensor shard."""
        first = (self.pp_size - 1 - pp_rank) * self.tp_size
        return list(range(first, first + self.tp_size))

    @property
    def next_stage_peer(self) -> int:
        """The same shard of the next stage (which reads this stage's hidden states)."""
        return self.rank - self.tp_size

    @property
    def prev_stage_peer(self) -> int:
        return self.rank + self.tp_size


def node_ranks(world_size: int, nnodes: int, node_rank: int) -> list[int]:
    """The global ranks node ``node_rank`` runs."""
    per = world_size // nnodes
    return list(range(node_rank * per, (node_rank + 1) * per))


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds (1, replicated, when there are fewer KV heads than ranks)."""
    return 1 if tp_size >= num_kv_heads else num_kv_heads // tp_size


def check_model_split(mc: ModelConfig, tp_size: int, pp_size: int) -> None:
    """Refuse, with one clear message, sizes this model cannot be split into."""
    problems = []
    if mc.num_heads % tp_size:
        problems.append(f"its {mc.num_heads} attention heads do not split over tensor_parallel_size={tp_size}")
    kv = mc.num_kv_heads
    if (tp_size < kv and kv % tp_size) or (tp_size >= kv and tp_size % kv):
        problems.append(f"its {kv} KV heads neither split over nor replicate evenly to tensor_parallel_size={tp_size}")
    if mc.intermediate_size % tp_size:
        problems.append(f"its intermediate size {mc.intermediate_size} does not split over tensor_parallel_size={tp_size}")
    if mc.num_layers < pp_size:
        problems.append(f"it has {mc.num_layers} layers, fewer than pipeline_parallel_size={pp_size}")
    if problems:
        raise ValueError(f"{mc.architecture} cannot run with tensor_parallel_size={tp_size}, "
                         f"pipeline_parallel_size={pp_size}: " + "; ".join(problems))


def layers_of(mc: ModelConfig, info: RankInfo) -> tuple[int, int]:
    """``[start, end)`` of the decoder layers ``info``'s stage runs."""
    return stage_layers(mc.num_layers, info.pp_size, info.pp_rank)
