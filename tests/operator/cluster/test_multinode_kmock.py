"""The kopf loop against kmock for multi-node replicas: the LeaderWorkerSet is created, kept true
(scaling, a new image, a new group size), its status becomes the InferenceService's, and switching
between one node and several swaps the Deployment and the LeaderWorkerSet (the old one pruned)."""

from __future__ import annotations

import pytest

from pageant.operator.builders import multinode

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]
LWS = "leaderworkerset.x-k8s.io/v1/leaderworkersets"
LEADER_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
TWO_NODES = {"tensorParallelSize": 2, "pipelineParallelSize": 2, "nodes": 2}


def _clean(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "status"} | {"metadata": {
        k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "uid", "generation")}}


def _containers(lws: dict) -> tuple[dict, dict]:
    lwt = lws["spec"]["leaderWorkerTemplate"]
    return lwt["leaderTemplate"]["spec"]["containers"][0], lwt["workerTemplate"]["spec"]["containers"][0]


async def _report(cluster, ready: int, replicas: int) -> None:
    """What the LeaderWorkerSet controller writes: groups that exist and are ready, for the
    generation it has seen."""
    gen = cluster.get("LeaderWorkerSet", "ml", "demo-lws")["metadata"]["generation"]
    await cluster.patch(LWS, "ml", "demo-lws", {"status": {
        "replicas": replicas, "readyReplicas": ready, "updatedReplicas": replicas, "observedGeneration": gen,
        "hpaPodSelector": "leaderworkerset.sigs.k8s.io/name=demo-lws,leaderworkerset.sigs.k8s.io/worker-index=0",
        "conditions": [{"type": "Available", "status": "True", "reason": "AllGroupsReady", "message": "ok",
                        "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, sub="status")


async def test_lws_created_updated_and_status_from_it(cluster, make_body, wait, validate_manifest):
    cluster.install("LeaderWorkerSet")
    await cluster.apply_is(make_body(engine=TWO_NODES, replicas=1))
    lws = await wait(lambda: cluster.get("LeaderWorkerSet", "ml", "demo-lws"), what="LeaderWorkerSet")
    validate_manifest(_clean(lws))
    leader, worker = _containers(lws)
    assert lws["spec"]["leaderWorkerTemplate"]["size"] == 2 and lws["spec"]["replicas"] == 1
    assert "--headless" in worker["args"] and leader["resources"]["limits"]["nvidia.com/gpu"] == "2"
    svc = await wait(lambda: cluster.get("Service", "ml", "demo"), what="Service")
    assert svc["spec"]["selector"][LEADER_LABEL] == "0"
    assert cluster.get("Deployment", "ml", "demo") is None
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "ModelLoading", what="ModelLoading")
    assert cluster.status("ml", "demo")["selector"].endswith(f"{LEADER_LABEL}=0,pageant.dev/inferenceservice=demo")
    # The LeaderWorkerSet controller reports the group ready: so does the InferenceService.
    await _report(cluster, ready=1, replicas=1)
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "AllReplicasReady", what="Ready")
    await wait(lambda: cluster.condition("ml", "demo", "Progressing").get("reason") == "Stable", what="Stable")
    assert (cluster.status("ml", "demo")["readyReplicas"], cluster.status("ml", "demo")["replicas"]) == (1, 1)
    # Scaling (what kubectl scale infsvc, KEDA and HPA write) changes the groups, not the templates.
    old_hash = multinode.template_hash(lws)
    await cluster.update_spec("ml", "demo", {"replicas": 2})
    lws = await wait(lambda: (o := cluster.get("LeaderWorkerSet", "ml", "demo-lws"))["spec"]["replicas"] == 2 and o,
                     what="2 groups")
    assert multinode.template_hash(lws) == old_hash
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "PartiallyReady", what="1/2")
    # A new image rolls both templates.
    await cluster.update_spec("ml", "demo", {"engine": {"image": "reg/engine:2"}})
    lws = await wait(lambda: (o := cluster.get("LeaderWorkerSet", "ml", "demo-lws")) and
                     _containers(o)[1]["image"] == "reg/engine:2" and o, what="new image")
    assert _containers(lws)[0]["image"] == "reg/engine:2" and multinode.template_hash(lws) != old_hash
    await _report(cluster, ready=2, replicas=2)
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "AllReplicasReady", what="2/2")
    # Four nodes per group: the size follows (LWS >= 0.7 resizes groups in a rolling update).
    await cluster.update_spec("ml", "demo", {"engine": {"pipelineParallelSize": 4, "nodes": 4}})
    lws = await wait(lambda: (o := cluster.get("LeaderWorkerSet", "ml", "demo-lws"))
                     ["spec"]["leaderWorkerTemplate"]["size"] == 4 and o, what="size 4")
    leader, worker = _containers(lws)
    assert leader["args"][leader["args"].index("--nnodes") + 1] == "4"
    assert leader["resources"]["limits"]["nvidia.com/gpu"] == "2"  # 8 ranks over 4 pods
    validate_manifest(_clean(lws))


async def test_switching_nodes_swaps_deployment_and_lws(cluster, make_body, wait):
    cluster.install("LeaderWorkerSet")
    await cluster.apply_is(make_body(engine={"tensorParallelSize": 2}, replicas=1))
    svc = await wait(lambda: cluster.get("Deployment", "ml", "demo") and cluster.get("Service", "ml", "demo"),
                     what="Deployment and Service")
    assert "leaderworkerset" not in str(svc["spec"]["selector"])
    # 1 -> 2 nodes: the LeaderWorkerSet is created and the Deployment deleted.
    await cluster.update_spec("ml", "demo", {"engine": {"nodes": 2}})
    await wait(lambda: cluster.get("LeaderWorkerSet", "ml", "demo-lws"), what="LeaderWorkerSet")
    await wait(lambda: cluster.get("Deployment", "ml", "demo") is None, what="Deployment pruned")
    await wait(lambda: cluster.get("Service", "ml", "demo")["spec"]["selector"].get(LEADER_LABEL) == "0")
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "ModelLoading", what="loading")
    # 2 -> 1: back to a Deployment; the Service selects every pod again (the leader key removed).
    await cluster.update_spec("ml", "demo", {"engine": {"nodes": None}})
    await wait(lambda: cluster.get("Deployment", "ml", "demo"), what="Deployment again")
    await wait(lambda: cluster.get("LeaderWorkerSet", "ml", "demo-lws") is None, what="LeaderWorkerSet pruned")
    await wait(lambda: LEADER_LABEL not in cluster.get("Service", "ml", "demo")["spec"]["selector"],
               what="selector without the leader label")
    await wait(lambda: cluster.status("ml", "demo")["selector"] ==
               "app.kubernetes.io/component=engine,pageant.dev/inferenceservice=demo", what="status.selector")


async def test_adapters_go_through_leaders_and_workers_report_problems(cluster, make_body, wait):
    cluster.install("LeaderWorkerSet")
    await cluster.apply_is(make_body(engine={**TWO_NODES, "maxLoras": 2}, replicas=1,
                                     adapters=[{"name": "sql", "hub": {"repo": "org/sql"}}]))
    await wait(lambda: cluster.get("LeaderWorkerSet", "ml", "demo-lws"), what="LeaderWorkerSet")
    engine = await cluster.start_group_pod("ml", "demo-lws", 0, 0, "tiny", ip="127.0.0.1")
    # A worker is headless; a fake engine on its IP all the same, to show nothing calls it.
    worker = await cluster.start_group_pod("ml", "demo-lws", 0, 1, "tiny", ip="127.0.0.2", serve=True)
    await _report(cluster, ready=1, replicas=1)
    await wait(lambda: engine.adapters == {"sql": "org/sql"}, what="adapter loaded on the leader")
    await wait(lambda: cluster.condition("ml", "demo", "AdaptersReady").get("status") == "True",
               what="AdaptersReady")
    assert "all 1 ready replicas" in cluster.condition("ml", "demo", "AdaptersReady")["message"]
    assert cluster.status("ml", "demo")["adapters"] == [{"name": "sql", "readyReplicas": 1, "state": "Loaded"}]
    assert engine.calls == [("load", "sql")] and worker.calls == [] and worker.adapters == {}
    # A worker that crash-loops shows on the InferenceService.
    await cluster.patch("v1/pods", "ml", "demo-lws-0-1", {"status": {"containerStatuses": [{
        "name": "engine", "ready": False, "restartCount": 3, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]}})
    await wait(lambda: cluster.condition("ml", "demo", "Degraded").get("reason") == "CrashLoop", what="CrashLoop")
    assert "demo-lws-0-1" in cluster.condition("ml", "demo", "Degraded")["message"]


async def test_without_the_lws_api_the_deployment_keeps_serving_until_it_is_installed(cluster, make_body, wait):
    await cluster.apply_is(make_body(engine={"tensorParallelSize": 4}))
    await wait(lambda: cluster.get("Deployment", "ml", "demo"), what="Deployment")
    await cluster.update_spec("ml", "demo", {"engine": TWO_NODES})
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "LeaderWorkerSetAPIMissing",
               what="LeaderWorkerSetAPIMissing")
    assert cluster.status("ml", "demo")["observedGeneration"] == 2
    assert "install its CRDs" in cluster.condition("ml", "demo", "Degraded")["message"]
    assert cluster.get("Deployment", "ml", "demo"), "nothing else serves yet: the Deployment must stay"
    cluster.install("LeaderWorkerSet")  # installed later: a resync creates it, then retires the Deployment
    await wait(lambda: cluster.get("LeaderWorkerSet", "ml", "demo-lws"), what="LeaderWorkerSet after install")
    await wait(lambda: cluster.get("Deployment", "ml", "demo") is None, what="Deployment retired")
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "ModelLoading", what="loading")
