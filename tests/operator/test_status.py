"""Pure status computation: what the children report becomes conditions with reasons."""

from __future__ import annotations

import asyncio
import socket

import kopf
import pytest

from pageant.operator import kube, spec, status


def _spec(make_body, **kw):
    return spec.parse(make_body(**kw))


def _dep(replicas=1, ready=0, updated=None, generation=1, observed=1, conditions=()):
    return {"metadata": {"name": "demo", "generation": generation},
            "status": {"replicas": replicas, "readyReplicas": ready,
                       "updatedReplicas": replicas if updated is None else updated,
                       "observedGeneration": observed, "conditions": list(conditions)}}


def _pod(name="p", ready=False, phase="Running", ip="10.0.0.1", **status_extra):
    st = {"phase": phase, "podIP": ip, "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}
    st.update(status_extra)
    return {"metadata": {"name": name}, "status": st}


def _cond(st, type_):
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_all_ready_and_stable(make_body):
    s = _spec(make_body, replicas=2)
    st = status.compute(s, status.Observed(deployment=_dep(2, 2), pods=[_pod("a", True), _pod("b", True)]), None)
    assert (st["replicas"], st["readyReplicas"], st["desiredReplicas"]) == (2, 2, 2)
    assert _cond(st, "Ready")["status"] == "True" and _cond(st, "Ready")["reason"] == "AllReplicasReady"
    assert _cond(st, "Progressing")["status"] == "False" and _cond(st, "Degraded")["status"] == "False"
    assert _cond(st, "AdaptersReady")["reason"] == "NoAdapters"
    assert st["url"] == "http://demo.ml.svc.cluster.local:8000/v1" and st["observedGeneration"] == 1
    assert all(c["observedGeneration"] == 1 and c["lastTransitionTime"] for c in st["conditions"])


def test_rollout_in_progress_and_partially_ready(make_body):
    s = _spec(make_body, replicas=3)
    st = status.compute(s, status.Observed(deployment=_dep(3, 2, updated=1, generation=2, observed=2)), None)
    assert _cond(st, "Ready")["reason"] == "PartiallyReady" and "2/3" in _cond(st, "Ready")["message"]
    assert _cond(st, "Progressing")["status"] == "True" and _cond(st, "Progressing")["reason"] == "RollingOut"
    st = status.compute(s, status.Observed(deployment=_dep(3, 0, generation=3, observed=2)), None)
    assert _cond(st, "Progressing")["status"] == "True" and _cond(st, "Ready")["reason"] == "ModelLoading"


@pytest.mark.parametrize("pod_status,reason", [
    ({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                          "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."}]},
     "InsufficientGPU"),
    ({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                                          "message": "0/4 nodes: node(s) had untolerated taint"}]}, "Unschedulable"),
    ({"containerStatuses": [{"name": "engine", "state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}}]},
     "ImagePullError"),
    ({"initContainerStatuses": [{"name": "wait", "state": {"waiting": {"reason": "ImagePullBackOff"}}}]}, "ImagePullError"),
    ({"containerStatuses": [{"name": "engine", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                             "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}, "CrashLoop"),
])
def test_pod_problems_become_reasons(make_body, pod_status, reason):
    s = _spec(make_body)
    pod = {"metadata": {"name": "demo-1"}, "status": {"phase": "Running", **pod_status}}
    st = status.compute(s, status.Observed(deployment=_dep(1, 0), pods=[pod]), None)
    assert _cond(st, "Ready") == {**_cond(st, "Ready"), "status": "False", "reason": reason}
    assert _cond(st, "Degraded")["status"] == "True" and _cond(st, "Degraded")["reason"] == reason
    assert "demo-1" in _cond(st, "Degraded")["message"]
    if reason == "CrashLoop":
        assert "OOMKilled" in _cond(st, "Degraded")["message"]


def test_progress_deadline_and_scaled_to_zero(make_body):
    s = _spec(make_body)
    stalled = {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
               "message": 'ReplicaSet "demo-5d" has timed out progressing.'}
    st = status.compute(s, status.Observed(deployment=_dep(1, 0, conditions=[stalled])), None)
    assert _cond(st, "Progressing")["reason"] == "ProgressDeadlineExceeded"
    assert _cond(st, "Degraded")["reason"] == "ProgressDeadlineExceeded"
    zero = _spec(make_body, replicas=0, autoscaling={"minReplicas": 0, "maxReplicas": 2})
    st = status.compute(zero, status.Observed(deployment=_dep(0, 0)), None)
    assert _cond(st, "Ready")["reason"] == "ScaledToZero" and _cond(st, "Progressing")["status"] == "False"


def test_adapter_counts(make_body):
    s = _spec(make_body, engine={"maxLoras": 2}, adapters=[{"name": "a", "hub": {"repo": "o/a"}},
                                                           {"name": "b", "hub": {"repo": "o/b"}}])
    pods = [_pod("x", True), _pod("y", True)]
    unknown = status.compute(s, status.Observed(deployment=_dep(2, 0)), None)
    assert _cond(unknown, "AdaptersReady")["status"] == "Unknown"
    partial = status.compute(s, status.Observed(deployment=_dep(2, 2), pods=pods, adapter_counts={"a": 2, "b": 1},
                                                adapter_errors=["pod y: load b: HTTP 404"]), None)
    assert partial["adapters"] == [{"name": "a", "readyReplicas": 2, "state": "Loaded"},
                                   {"name": "b", "readyReplicas": 1, "state": "Loading"}]
    assert _cond(partial, "AdaptersReady")["status"] == "False" and "b (1/2)" in _cond(partial, "AdaptersReady")["message"]
    assert "HTTP 404" in _cond(partial, "AdaptersReady")["message"]
    full = status.compute(s, status.Observed(deployment=_dep(2, 2), pods=pods, adapter_counts={"a": 2, "b": 2}), None)
    assert _cond(full, "AdaptersReady")["status"] == "True"


def test_transition_time_kept_while_status_unchanged(make_body):
    s = _spec(make_body)
    first = status.compute(s, status.Observed(deployment=_dep(1, 1), pods=[_pod(ready=True)]), None)
    old = {"conditions": [dict(c, lastTransitionTime="2020-01-01T00:00:00Z") for c in first["conditions"]]}
    again = status.compute(s, status.Observed(deployment=_dep(1, 1), pods=[_pod(ready=True)]), old)
    assert all(c["lastTransitionTime"] == "2020-01-01T00:00:00Z" for c in again["conditions"])
    flipped = status.compute(s, status.Observed(deployment=_dep(1, 0)), old)
    assert _cond(flipped, "Ready")["lastTransitionTime"] != "2020-01-01T00:00:00Z"


def test_invalid_spec_status_keeps_other_conditions():
    old = {"conditions": [{"type": "AdaptersReady", "status": "True", "reason": "NoAdapters"}]}
    st = status.invalid(4, "spec.model: required", old)
    assert _cond(st, "Ready")["reason"] == "InvalidSpec" and _cond(st, "Degraded")["reason"] == "InvalidSpec"
    assert _cond(st, "AdaptersReady")["reason"] == "NoAdapters" and st["observedGeneration"] == 4


def test_unreachable_api_server_is_a_typed_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the with-block ends: nothing listens there

    async def call():
        client = kube.KubeClient(timeout_seconds=2)
        client.set_connection(kopf.ConnectionInfo(server=f"http://127.0.0.1:{port}"))
        try:
            await client.get("Deployment", "ml", "demo")
        finally:
            await client.close()

    with pytest.raises(kube.Unreachable):
        asyncio.run(call())


def _parented(*conds):
    return {"metadata": {"name": "demo"}, "status": {"parents": [{
        "parentRef": {"name": "gw"}, "conditions": [{"type": t, "status": s, "reason": r, "message": m}
                                                    for t, s, r, m in conds]}]}}


def test_routed_from_route_and_pool_status(make_body):
    s = _spec(make_body, routing={"inferencePool": {"enabled": True, "gateway": {"name": "gw"}}})
    ok = [("Accepted", "True", "Accepted", ""), ("ResolvedRefs", "True", "ResolvedRefs", "")]
    st = status.compute(s, status.Observed(deployment=_dep(), route=_parented(*ok), pool=_parented(*ok)), None)
    assert _cond(st, "Routed")["status"] == "True" and "ml/gw" in _cond(st, "Routed")["message"]
    pending = status.compute(s, status.Observed(deployment=_dep(), route={"metadata": {"name": "demo"}},
                                                pool=_parented(*ok)), None)
    assert (_cond(pending, "Routed")["status"], _cond(pending, "Routed")["reason"]) == ("Unknown", "Pending")
    refused = status.compute(s, status.Observed(deployment=_dep(), route=_parented(
        ("Accepted", "False", "NotAllowedByListeners", "no listener allows this route"), ok[1]),
        pool=_parented(*ok)), None)
    assert _cond(refused, "Routed")["reason"] == "HTTPRouteNotAccepted"
    assert "NotAllowedByListeners" in _cond(refused, "Routed")["message"]
    unresolved = status.compute(s, status.Observed(deployment=_dep(), route=_parented(*ok), pool=_parented(
        ok[0], ("ResolvedRefs", "False", "InvalidExtensionRef", "epp not found"))), None)
    assert _cond(unresolved, "Routed")["reason"] == "InferencePoolRefsNotResolved"
    missing = status.compute(s, status.Observed(deployment=_dep()), None)
    assert _cond(missing, "Routed")["reason"] == "HTTPRouteMissing"
    plain = status.compute(_spec(make_body), status.Observed(deployment=_dep()), None)
    assert "Routed" not in {c["type"] for c in plain["conditions"]}


def test_failed_adapter_state_and_wake_url(make_body):
    s = _spec(make_body, engine={"maxLoras": 2}, adapters=[{"name": "a", "hub": {"repo": "o/a"}}],
              autoscaling={"minReplicas": 0, "maxReplicas": 2})
    st = status.compute(s, status.Observed(deployment=_dep(1, 1), pods=[_pod("x", True)], adapter_counts={"a": 0},
                                           adapter_failed={"a": "pod x: HTTP 404 no such adapter"}, wake=True), None)
    assert st["adapters"] == [{"name": "a", "readyReplicas": 0, "state": "Failed",
                               "message": "pod x: HTTP 404 no such adapter"}]
    assert st["url"] == "http://demo-wake.ml.svc.cluster.local:8080/v1"
    assert status.compute(s, status.Observed(deployment=_dep()), None)["url"] == "http://demo.ml.svc.cluster.local:8000/v1"
