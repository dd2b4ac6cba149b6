"""The parallel layout's part of the InferenceService schema: tensor and pipeline parallelism, and
replicas that span several nodes (a LeaderWorkerSet instead of a Deployment).

Kept apart from :mod:`pageant.operator.schema` (which imports it) so that the layout's fields, its
CEL rules and their messages sit in one place; :mod:`pageant.operator.spec_parallel` re-checks the
same rules in Python, by these names.

The layout: ``tensorParallelSize x pipelineParallelSize`` ranks (one GPU each, vLLM's layout) are
spread evenly over ``nodes`` pods; every pod runs ``tp x pp / nodes`` of them. No field has a CRD
default, so an object stored before these fields existed renders exactly as before.
"""

from __future__ import annotations

from typing import Any

LWS_API_VERSION = "leaderworkerset.x-k8s.io/v1"


def _layout(obj: str) -> tuple[str, str, str]:
    """CEL for (tensorParallelSize, pipelineParallelSize, nodes) of ``obj``, each 1 when unset."""
    return tuple(f"(has({obj}.{f}) ? {obj}.{f} : 1)"  # type: ignore[return-value]
                 for f in ("tensorParallelSize", "pipelineParallelSize", "nodes"))


_TP, _PP, _NODES = _layout("self")
# On spec.engine: every node runs the same number of ranks.
RULE_NODES_DIVIDE_RANKS = f"({_TP} * {_PP}) % {_NODES} == 0"
MESSAGE_NODES_DIVIDE_RANKS = ("tensorParallelSize x pipelineParallelSize must be a multiple of nodes "
                              "(every node runs the same number of ranks)")
# On spec: an explicit resources.gpus must hold the ranks of one pod (one GPU per rank); a single
# rank may run on CPU (gpus 0).
_ETP, _EPP, _ENODES = _layout("self.engine")
RULE_GPUS_HOLD_RANKS = ("!has(self.resources) || !has(self.resources.gpus) || !has(self.engine) || "
                        f"{_ETP} * {_EPP} == 1 || self.resources.gpus * {_ENODES} >= {_ETP} * {_EPP}")
MESSAGE_GPUS_HOLD_RANKS = ("resources.gpus must hold the ranks of one pod, engine.tensorParallelSize x "
                           "engine.pipelineParallelSize / engine.nodes (one GPU per rank)")


def _int(description: str) -> dict[str, Any]:
    return {"type": "integer", "format": "int32", "description": description, "minimum": 1}


def engine_properties() -> dict[str, Any]:
    """spec.engine's layout fields (merged into the engine object's properties)."""
    return {
        "tensorParallelSize": _int("--tensor-parallel-size: GPUs each layer is split over. Ranks per "
                                   "replica = tensorParallelSize x pipelineParallelSize, one GPU each."),
        "pipelineParallelSize": _int("--pipeline-parallel-size: pipeline stages (each holds a range of "
                                     "the layers)."),
        "nodes": _int("Pods (nodes) per replica. 1: a Deployment. More: a LeaderWorkerSet "
                      f"({LWS_API_VERSION}, LWS v0.7 or newer installed) whose groups are the replicas: a "
                      "leader that serves the API and nodes-1 headless workers, each pod running "
                      "tensorParallelSize x pipelineParallelSize / nodes ranks; a failing pod restarts "
                      "its whole group."),
    }


def engine_rules() -> list[dict[str, str]]:
    return [{"rule": RULE_NODES_DIVIDE_RANKS, "message": MESSAGE_NODES_DIVIDE_RANKS}]


def spec_rules() -> list[dict[str, str]]:
    return [{"rule": RULE_GPUS_HOLD_RANKS, "message": MESSAGE_GPUS_HOLD_RANKS}]


GPUS_DESCRIPTION = ("GPUs per pod (limits). Default: the ranks of one pod, engine.tensorParallelSize x "
                    "pipelineParallelSize / nodes (1 for a single-GPU replica). 0 runs one rank on CPU.")
