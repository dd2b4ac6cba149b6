"""The parallel layout of an InferenceService, parsed and checked (pure; no I/O).

``spec.engine.tensorParallelSize`` x ``pipelineParallelSize`` ranks (vLLM's layout, one GPU per
rank) spread evenly over ``spec.engine.nodes`` pods. :func:`parse` re-checks the CEL rules of
:mod:`pageant.operator.schema_parallel` and resolves the GPUs per pod: ``spec.resources.gpus`` when
given (it must hold the pod's ranks), else exactly the pod's ranks. That default is what KServe and
KubeAI users expect from a parallel layout: ask for tp=8 and each pod requests 8 GPUs, with no
second number to keep in step; a single-rank service keeps its one GPU.

Same habits as spec.py: every problem is collected on the reader, none raised here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from pageant.operator import schema_parallel
from pageant.operator.spec_ext import _Reader

LWS_SUFFIX = "-lws"  # the LeaderWorkerSet's name: <name>-lws (its headless Service takes that name)
# A StatefulSet's pods carry the label controller-revision-hash=<statefulset>-<hash of up to 10
# characters>, and label values stop at 63 characters: StatefulSet names must stay within 52. The
# LeaderWorkerSet names one StatefulSet per group (replica): <name>-lws-<group index>.
STATEFULSET_NAME_LIMIT = 52


@dataclasses.dataclass(frozen=True)
class ParallelSpec:
    """One replica's rank layout. The sizes are None when unset: their flags are then not rendered
    and the engine's default (1) applies; ``nodes`` > 1 makes the replica a LeaderWorkerSet group."""
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    nodes: int = 1

    @property
    def world_size(self) -> int:
        """Ranks per replica: tp x pp."""
        return (self.tensor_parallel_size or 1) * (self.pipeline_parallel_size or 1)

    @property
    def ranks_per_node(self) -> int:
        """Ranks (and so GPUs) in each pod of a replica, rounded up if the layout does not divide."""
        return -(-self.world_size // self.nodes)

    @property
    def multinode(self) -> bool:
        return self.nodes > 1

    def describe(self) -> str:
        """The layout in words, for messages."""
        where = f"over {self.nodes} nodes" if self.multinode else "on one node"
        return (f"tensorParallelSize {self.tensor_parallel_size or 1} x pipelineParallelSize "
                f"{self.pipeline_parallel_size or 1} = {self.world_size} ranks {where}")


def parse(r: _Reader, engine_raw: dict[str, Any], resources_raw: dict[str, Any]) -> tuple[ParallelSpec, int]:
    """(the layout, GPUs per pod) from spec.engine and spec.resources."""
    p = "spec.engine"
    sizes: dict[str, int | None] = {}
    for key in ("tensorParallelSize", "pipelineParallelSize", "nodes"):
        value = r.get(engine_raw, key, int, p)
        r.minimum(value, 1, f"{p}.{key}")
        sizes[key] = value if value is not None and value >= 1 else None
    layout = ParallelSpec(sizes["tensorParallelSize"], sizes["pipelineParallelSize"], sizes["nodes"] or 1)
    if layout.world_size % layout.nodes:  # the CEL rule RULE_NODES_DIVIDE_RANKS
        r.problems.append(f"{p}.nodes: {layout.describe()}: {schema_parallel.MESSAGE_NODES_DIVIDE_RANKS}")
    gpus = r.get(resources_raw, "gpus", int, "spec.resources")
    r.minimum(gpus, 0, "spec.resources.gpus")
    if gpus is None or gpus < 0:
        return layout, layout.ranks_per_node
    if layout.world_size > 1 and gpus < layout.ranks_per_node:  # the CEL rule RULE_GPUS_HOLD_RANKS
        r.problems.append(f"spec.resources.gpus: {gpus} per pod cannot hold its {layout.ranks_per_node} ranks "
                          f"({layout.describe()}, one GPU per rank): set at least {layout.ranks_per_node} "
                          "or leave it unset")
    return layout, gpus


def check_name(r: _Reader, name: Any, layout: ParallelSpec, max_groups: int) -> None:
    """A multi-node service's name must leave room for its StatefulSets' names (see
    STATEFULSET_NAME_LIMIT): ``<name>-lws-<group index>`` for up to ``max_groups`` groups."""
    if not layout.multinode or not isinstance(name, str):
        return
    digits = len(str(max(max_groups - 1, 0)))
    limit = STATEFULSET_NAME_LIMIT - len(LWS_SUFFIX) - 1 - digits
    if len(name) > limit:
        r.problems.append(
            f"metadata.name: {name!r} has {len(name)} characters; with spec.engine.nodes > 1 and up to "
            f"{max_groups} replicas at most {limit}: the LeaderWorkerSet names a StatefulSet "
            f"{name}{LWS_SUFFIX}-<replica> per replica, whose pods' controller-revision-hash label "
            "must stay within 63 characters")
