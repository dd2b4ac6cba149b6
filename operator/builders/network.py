"""Service, NetworkPolicy and PodDisruptionBudget."""

from __future__ import annotations

from typing import Any

from pageant.operator.builders import common
from pageant.operator.spec import InferenceServiceSpec


def service(spec: InferenceServiceSpec) -> dict[str, Any]:
    """ClusterIP Service with port `http` 8000 (the URL in status points here), on the pods that
    serve the API (with engine.nodes > 1 the groups' leaders)."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": common.metadata(spec, common.names(spec)["service"], common.COMPONENT),
        "spec": {"type": "ClusterIP", "selector": common.serving_labels(spec),
                 "ports": [{"name": "http", "port": common.HTTP_PORT, "targetPort": "http", "protocol": "TCP"}]},
    }


def network_policy(spec: InferenceServiceSpec) -> dict[str, Any]:
    """Admit ingress only on the API port (which also serves /metrics); egress is untouched. With
    engine.nodes > 1 the pods of the service also reach each other on any port: the rendezvous
    port and the ports NCCL picks between the ranks."""
    ingress: list[dict[str, Any]] = [{"ports": [{"protocol": "TCP", "port": common.HTTP_PORT}]}]
    if spec.parallel.multinode:
        ingress.append({"from": [{"podSelector": {"matchLabels": common.selector_labels(spec)}}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": common.metadata(spec, common.names(spec)["networkpolicy"], common.COMPONENT),
        "spec": {"podSelector": {"matchLabels": common.selector_labels(spec)}, "policyTypes": ["Ingress"],
                 "ingress": ingress},
    }


def wants_pdb(spec: InferenceServiceSpec) -> bool:
    """A PDB only when more than one replica can exist (with one it would block node drains)."""
    if spec.autoscaling is not None:
        return spec.autoscaling.min_replicas > 1 or (spec.replicas or 0) > 1
    return spec.desired_replicas > 1


def pod_disruption_budget(spec: InferenceServiceSpec) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": common.metadata(spec, common.names(spec)["pdb"], common.COMPONENT),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": common.selector_labels(spec)}},
    }
