"""Replicas that span several nodes (spec.engine.nodes > 1): a LeaderWorkerSet instead of a Deployment.

One LeaderWorkerSet group per replica: its ``replicas`` is the InferenceService's (so ``kubectl
scale infsvc``, KEDA and HPA count groups, through the InferenceService's scale subresource as for
a Deployment) and its ``size`` is engine.nodes pods. Every pod runs the same ``pageant serve``
command with ``--nnodes`` and the group's rendezvous: the leader (worker index 0) is node rank 0,
serves the API on port 8000 and holds the probes; the workers add ``--headless`` and take their
rank from ``LWS_WORKER_INDEX``. All of them reach the leader at ``LWS_LEADER_ADDRESS``
(``<lws>-<group>.<lws>.<namespace>``); the LeaderWorkerSet's pod webhook sets both variables in
every container and kubelet expands ``$(VAR)`` in the args from them.

That address resolves through the headless Service the LeaderWorkerSet controller creates under
the LeaderWorkerSet's own name, which is why the LeaderWorkerSet is ``<name>-lws`` and not
``<name>``: the engine's Service (the URL in status) has that name and selects leaders only.

- ``restartPolicy: RecreateGroupOnPodRestart``: a rank that dies breaks the whole NCCL group, so the
  controller recreates every pod of the group together.
- ``startupPolicy: LeaderCreated``: workers start with the leader; the leader is ready only once
  every rank has joined, so ``LeaderReady`` would never start them.
- rollouts replace one group at a time with ``maxSurge: 0``: like the Deployment, an update never
  needs a spare set of GPU nodes.
"""

from __future__ import annotations

from typing import Any

from pageant.operator.builders import common, workload
from pageant.operator.schema_parallel import LWS_API_VERSION
from pageant.operator.spec import InferenceServiceSpec

API_VERSION = LWS_API_VERSION
KIND = "LeaderWorkerSet"
MASTER_PORT = 29500  # torch.distributed's default: rank 0's rendezvous store, on the leader
LEADER_ADDRESS = "$(LWS_LEADER_ADDRESS)"
WORKER_INDEX = "$(LWS_WORKER_INDEX)"


def _require(spec: InferenceServiceSpec) -> int:
    if not spec.parallel.multinode:
        raise ValueError("a LeaderWorkerSet is only rendered for spec.engine.nodes > 1")
    return spec.parallel.nodes


def node_args(spec: InferenceServiceSpec, leader: bool) -> list[str]:
    """One pod's place in its group: `--nnodes N --node-rank R --master-addr A --master-port P`
    (vLLM's multi-node flags), and `--headless` on the workers."""
    nodes = _require(spec)
    rank = ["--node-rank", "0"] if leader else ["--headless", "--node-rank", WORKER_INDEX]
    return ["--nnodes", str(nodes), *rank, "--master-addr", LEADER_ADDRESS, "--master-port", str(MASTER_PORT)]


def leader_template(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The leader's pod template: the API port, the rendezvous port, the probes."""
    return workload.pod_template(spec, node_args(spec, leader=True), serves_api=True, extra_ports=[
        {"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"}])


def worker_template(spec: InferenceServiceSpec) -> dict[str, Any]:
    """A worker's pod template: the same engine, headless (no API port, no probes)."""
    return workload.pod_template(spec, node_args(spec, leader=False), serves_api=False)


def leader_worker_set(spec: InferenceServiceSpec) -> dict[str, Any]:
    """leaderworkerset.x-k8s.io/v1 LeaderWorkerSet: spec.replicas groups of engine.nodes pods."""
    nodes = _require(spec)
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": common.metadata(spec, common.names(spec)["leaderworkerset"], common.COMPONENT),
        "spec": {
            "replicas": spec.desired_replicas,
            "startupPolicy": "LeaderCreated",
            "rolloutStrategy": {"type": "RollingUpdate",
                                "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0}},
            "leaderWorkerTemplate": {
                "size": nodes,
                "restartPolicy": "RecreateGroupOnPodRestart",
                "leaderTemplate": leader_template(spec),
                "workerTemplate": worker_template(spec),
            },
        },
    }


def template_hash(lws: dict[str, Any]) -> str | None:
    """The config hash a LeaderWorkerSet's leader template carries (a serving change changes both
    templates' hashes)."""
    tmpl = ((lws.get("spec") or {}).get("leaderWorkerTemplate") or {}).get("leaderTemplate") or {}
    return ((tmpl.get("metadata") or {}).get("annotations") or {}).get(common.CONFIG_HASH_ANNOTATION)
