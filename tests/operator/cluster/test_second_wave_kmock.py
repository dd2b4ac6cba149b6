"""The kopf loop against kmock for the second wave: scale from zero through the KEDA HTTP add-on,
Gateway routing through an InferencePool (and its status), failing adapters with backoff."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]
IS = "pageant.dev/v1alpha1/inferenceservices"
ROUTING = {"inferencePool": {"enabled": True, "gateway": {"name": "inference-gw", "namespace": "gateways"}}}
OK = [{"type": "Accepted", "status": "True", "reason": "Accepted"},
      {"type": "ResolvedRefs", "status": "True", "reason": "ResolvedRefs"}]


def _clean(obj: dict) -> dict:
    return {k: v for k, v in obj.items() if k != "status"} | {"metadata": {
        k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "uid", "generation")}}


async def test_create_with_scale_to_zero_renders_the_add_on_objects(cluster, make_body, wait, validate_manifest):
    cluster.install("ScaledObject")
    cluster.install("InterceptorRoute")
    await cluster.apply_is(make_body(autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleFromZero": {
        "timeouts": {"readiness": "40m"}}}))
    route = await wait(lambda: cluster.get("InterceptorRoute", "ml", "demo"), what="InterceptorRoute")
    svc = await wait(lambda: cluster.get("Service", "ml", "demo-wake"), what="wake Service")
    so = await wait(lambda: cluster.get("ScaledObject", "ml", "demo"), what="ScaledObject")
    for obj in (route, svc, so):
        validate_manifest(_clean(obj))
    assert route["spec"]["timeouts"]["readiness"] == "40m" and route["spec"]["target"]["service"] == "demo"
    assert svc["spec"]["type"] == "ExternalName"
    assert so["spec"]["idleReplicaCount"] == 0
    assert [t["type"] for t in so["spec"]["triggers"]] == ["prometheus", "external-push"]
    await wait(lambda: cluster.status("ml", "demo").get("url") == "http://demo-wake.ml.svc.cluster.local:8080/v1")
    await wait(lambda: cluster.condition("ml", "demo", "Degraded").get("reason") == "AsExpected")
    # A fixed floor of one: the add-on's objects go (the spec handlers prune them).
    await cluster.update_spec("ml", "demo", {"autoscaling": {"minReplicas": 1, "maxReplicas": 2}})
    await wait(lambda: cluster.get("InterceptorRoute", "ml", "demo") is None, what="InterceptorRoute pruned")
    await wait(lambda: cluster.get("Service", "ml", "demo-wake") is None, what="wake Service pruned")
    await wait(lambda: cluster.status("ml", "demo").get("url") == "http://demo.ml.svc.cluster.local:8000/v1")


async def test_routing_renders_pool_picker_route_and_reads_their_status(cluster, make_body, wait, validate_manifest):
    cluster.install("InferencePool")
    cluster.install("HTTPRoute")
    await cluster.apply_is(make_body(routing=ROUTING))
    for kind, name in [("ServiceAccount", "demo-epp"), ("Role", "demo-epp"), ("RoleBinding", "demo-epp"),
                       ("ConfigMap", "demo-epp"), ("Deployment", "demo-epp"), ("Service", "demo-epp"),
                       ("InferencePool", "demo"), ("HTTPRoute", "demo")]:
        obj = await wait(lambda: cluster.get(kind, "ml", name), what=f"{kind}/{name}")
        validate_manifest(_clean(obj))
    await wait(lambda: cluster.condition("ml", "demo", "Routed").get("reason") == "Pending", what="Routed Pending")
    assert cluster.condition("ml", "demo", "Routed")["status"] == "Unknown"
    # The Gateway refuses the route, then accepts it; the pool's picker resolves.
    parent = {"parentRef": {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "inference-gw",
                            "namespace": "gateways"}, "controllerName": "example.com/gateway"}
    refused = [{"type": "Accepted", "status": "False", "reason": "NotAllowedByListeners", "message": "no listener"},
               OK[1]]
    await cluster.patch("gateway.networking.k8s.io/v1/httproutes", "ml", "demo",
                        {"status": {"parents": [parent | {"conditions": refused}]}}, sub="status")
    await cluster.patch("inference.networking.k8s.io/v1/inferencepools", "ml", "demo",
                        {"status": {"parents": [parent | {"conditions": OK}]}}, sub="status")
    await wait(lambda: cluster.condition("ml", "demo", "Routed").get("reason") == "HTTPRouteNotAccepted")
    assert "NotAllowedByListeners" in cluster.condition("ml", "demo", "Routed")["message"]
    await cluster.patch("gateway.networking.k8s.io/v1/httproutes", "ml", "demo",
                        {"status": {"parents": [parent | {"conditions": OK}]}}, sub="status")
    await wait(lambda: cluster.condition("ml", "demo", "Routed").get("status") == "True", what="Routed True")
    # Routing off: every routing object is pruned, the engine's Deployment and Service stay.
    await cluster.update_spec("ml", "demo", {"routing": None})
    for kind, name in [("HTTPRoute", "demo"), ("InferencePool", "demo"), ("Deployment", "demo-epp"),
                       ("Service", "demo-epp"), ("RoleBinding", "demo-epp"), ("Role", "demo-epp"),
                       ("ServiceAccount", "demo-epp"), ("ConfigMap", "demo-epp")]:
        await wait(lambda: cluster.get(kind, "ml", name) is None, what=f"{kind}/{name} pruned")
    assert cluster.get("Deployment", "ml", "demo") and cluster.get("Service", "ml", "demo")
    await wait(lambda: not cluster.condition("ml", "demo", "Routed"), what="no Routed condition")


async def test_routing_without_its_crds_is_reported(cluster, make_body, wait):
    await cluster.apply_is(make_body(routing=ROUTING))
    await wait(lambda: cluster.condition("ml", "demo", "Routed").get("reason") == "HTTPRouteMissing")
    assert "APIMissing" in cluster.condition("ml", "demo", "Degraded")["reason"]
    assert cluster.get("Deployment", "ml", "demo-epp")  # the picker itself needs no CRD


async def test_failing_adapter_is_failed_with_backoff_and_recovers(cluster, make_body, wait):
    await cluster.apply_is(make_body(engine={"maxLoras": 2}, adapters=[{"name": "broken", "hub": {"repo": "org/x"}}]))
    await wait(lambda: cluster.get("Deployment", "ml", "demo"))
    engine = await cluster.start_pod("ml", "demo", 0, "tiny")
    engine.fail_load.add("broken")

    def adapter():
        return (cluster.status("ml", "demo").get("adapters") or [{}])[0]

    await wait(lambda: adapter().get("state") == "Failed", what="Failed")
    assert "no such adapter" in adapter()["message"]
    start = engine.calls.count(("load", "broken"))
    await asyncio.sleep(2.5)  # ~8 resync passes; backoff 0.5 s doubling allows at most 3 more tries
    assert engine.calls.count(("load", "broken")) - start <= 3
    assert adapter()["state"] == "Failed"
    engine.fail_load.clear()  # fixed
    await wait(lambda: adapter().get("state") == "Loaded", timeout=20, what="Loaded after the fix")
    assert engine.adapters == {"broken": "org/x"}
    await wait(lambda: cluster.condition("ml", "demo", "AdaptersReady").get("status") == "True")
