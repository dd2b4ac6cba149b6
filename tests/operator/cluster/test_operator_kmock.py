"""The real kopf operator, in-process, against kmock (kopf's mock Kubernetes API) and fake pods."""

from __future__ import annotations

import asyncio

import pytest

from pageant.operator.builders import workload

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(90)]
IS = "pageant.dev/v1alpha1/inferenceservices"
UID = "0b7c3f0e-1111-4222-8333-444455556666"


def owned(obj: dict) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == UID and r["controller"] and r["kind"] == "InferenceService" for r in refs)


async def test_create_makes_owned_children_once(cluster, make_body, wait):
    await cluster.apply_is(make_body(replicas=2))
    for kind in ("Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"):
        obj = await wait(lambda: cluster.get(kind, "ml", "demo"), what=kind)
        assert owned(obj), kind
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "pageant-operator"
    status = await wait(lambda: cluster.status("ml", "demo").get("url") and cluster.status("ml", "demo"))
    assert status["url"] == "http://demo.ml.svc.cluster.local:8000/v1"
    assert status["observedGeneration"] == 1 and status["desiredReplicas"] == 2
    assert status["selector"] == "app.kubernetes.io/component=engine,pageant.dev/inferenceservice=demo"
    assert {c["type"] for c in status["conditions"]} == {"Ready", "Progressing", "Degraded", "AdaptersReady"}
    # Idempotent: many resync passes later, every child was created exactly once.
    passes = cluster.metrics.reconciliations.labels("resync", "success")
    start = passes._value.get()
    await wait(lambda: passes._value.get() >= start + 3, what="3 resync passes")
    for path in ("/deployments", "/services", "/networkpolicies", "/poddisruptionbudgets"):
        assert len(cluster.requests("POST", path)) == 1, path
    assert cluster.get("Deployment", "ml", "demo")["spec"]["replicas"] == 2


async def test_spec_change_patches_deployment_and_rolls_pods(cluster, make_body, wait):
    await cluster.apply_is(make_body())
    dep = await wait(lambda: cluster.get("Deployment", "ml", "demo"))
    old_hash = workload.template_hash(dep)
    # A serving change: new args, new template hash (the Deployment controller rolls the pods).
    await cluster.update_spec("ml", "demo", {"engine": {"maxModelLen": 2048}})
    dep = await wait(lambda: (d := cluster.get("Deployment", "ml", "demo")) and workload.template_hash(d) != old_hash
                     and d, what="rolled template")
    assert "--max-model-len" in dep["spec"]["template"]["spec"]["containers"][0]["args"]
    await wait(lambda: cluster.status("ml", "demo").get("observedGeneration") == 2, what="observedGeneration 2")
    # A scale change: replicas follow, the template (and so the pods) do not change.
    new_hash = workload.template_hash(dep)
    await cluster.update_spec("ml", "demo", {"replicas": 3})
    dep = await wait(lambda: (d := cluster.get("Deployment", "ml", "demo"))["spec"]["replicas"] == 3 and d)
    assert workload.template_hash(dep) == new_hash
    assert await wait(lambda: cluster.get("PodDisruptionBudget", "ml", "demo"), what="PDB once replicas > 1")


async def test_drift_is_repaired(cluster, make_body, wait):
    await cluster.apply_is(make_body())
    await wait(lambda: cluster.get("Service", "ml", "demo") and cluster.get("Deployment", "ml", "demo"))
    await cluster.delete("v1/services", "ml", "demo")
    svc = await wait(lambda: cluster.get("Service", "ml", "demo"), what="Service recreated")
    assert owned(svc) and svc["spec"]["ports"][0]["port"] == 8000
    dep = cluster.get("Deployment", "ml", "demo")
    bad = dep["spec"]["template"]["spec"]["containers"][0] | {"args": ["--hacked"]}
    await cluster.patch("apps/v1/deployments", "ml", "demo", {"spec": {"template": {"spec": {"containers": [bad]}}}})
    await wait(lambda: "--hacked" not in cluster.get("Deployment", "ml", "demo")["spec"]["template"]["spec"]
               ["containers"][0]["args"], what="Deployment args restored")


async def test_children_status_becomes_conditions(cluster, make_body, wait):
    await cluster.apply_is(make_body(replicas=2))
    await wait(lambda: cluster.get("Deployment", "ml", "demo"))
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "ModelLoading", what="ModelLoading")
    # A pod that cannot be scheduled for lack of GPUs.
    pending = {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "demo-x", "namespace": "ml", "labels": {"pageant.dev/inferenceservice": "demo",
                                                        "app.kubernetes.io/component": "engine"}},
        "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                        "reason": "Unschedulable",
                                                        "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}}
    await cluster.create("v1/pods", pending)
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "InsufficientGPU", what="InsufficientGPU")
    assert cluster.condition("ml", "demo", "Degraded")["status"] == "True"
    # An image that cannot be pulled.
    await cluster.patch("v1/pods", "ml", "demo-x", {"status": {"conditions": [], "containerStatuses": [{
        "name": "engine", "ready": False, "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}}]}})
    await wait(lambda: cluster.condition("ml", "demo", "Degraded").get("reason") == "ImagePullError", what="ImagePullError")
    assert "ImagePullBackOff" in cluster.condition("ml", "demo", "Degraded")["message"]
    # A crash loop.
    await cluster.patch("v1/pods", "ml", "demo-x", {"status": {"containerStatuses": [{
        "name": "engine", "ready": False, "restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "reason": "Error"}}}]}})
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "CrashLoop", what="CrashLoop")
    # The pod recovers and the Deployment reports both replicas ready and up to date.
    await cluster.delete("v1/pods", "ml", "demo-x")
    await cluster.patch("apps/v1/deployments", "ml", "demo", {"status": {
        "observedGeneration": 1, "replicas": 2, "readyReplicas": 2, "updatedReplicas": 2, "availableReplicas": 2}})
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("status") == "True", what="Ready")
    st = cluster.status("ml", "demo")
    assert st["readyReplicas"] == 2 and st["replicas"] == 2
    assert cluster.condition("ml", "demo", "Progressing")["status"] == "False"
    assert cluster.condition("ml", "demo", "Degraded")["status"] == "False"


async def test_adapters_load_and_unload_live(cluster, make_body, wait):
    loras = {"claimName": "loras"}
    body = make_body(replicas=2, engine={"maxLoras": 4},
                     adapters=[{"name": "sql", "pvc": {**loras, "path": "sql"}},
                               {"name": "sum", "pvc": {**loras, "path": "sum"}}])
    await cluster.apply_is(body)
    dep = await wait(lambda: cluster.get("Deployment", "ml", "demo"))
    template_hash = workload.template_hash(dep)
    engines = [await cluster.start_pod("ml", "demo", i, "tiny") for i in range(2)]
    await cluster.patch("apps/v1/deployments", "ml", "demo", {"status": {"replicas": 2, "readyReplicas": 2,
                                                                          "updatedReplicas": 2}})
    await wait(lambda: all(e.adapters == {"sql": "/adapters/loras/sql", "sum": "/adapters/loras/sum"}
                           for e in engines), what="sql and sum loaded")
    await wait(lambda: cluster.status("ml", "demo").get("adapters") == [{"name": "sql", "readyReplicas": 2, "state": "Loaded"},
                                                                        {"name": "sum", "readyReplicas": 2, "state": "Loaded"}])
    await wait(lambda: cluster.condition("ml", "demo", "AdaptersReady").get("status") == "True")
    # Add one, remove one: every running replica follows, no new pod template.
    await cluster.update_spec("ml", "demo", {"adapters": [{"name": "sum", "pvc": {**loras, "path": "sum"}},
                                                          {"name": "tldr", "pvc": {**loras, "path": "tldr"}}]})
    await wait(lambda: all(set(e.adapters) == {"sum", "tldr"} for e in engines), what="tldr loaded, sql unloaded")
    assert all(("unload", "sql") in e.calls for e in engines)
    await wait(lambda: cluster.status("ml", "demo").get("adapters") == [{"name": "sum", "readyReplicas": 2, "state": "Loaded"},
                                                                        {"name": "tldr", "readyReplicas": 2, "state": "Loaded"}])
    cm = cluster.get("ConfigMap", "ml", "demo-adapters")
    assert '"tldr"' in cm["data"]["adapters.json"] and '"sql"' not in cm["data"]["adapters.json"]
    assert workload.template_hash(cluster.get("Deployment", "ml", "demo")) == template_hash
    # A replica whose engine lost its adapters (restart) gets them back.
    engines[1].adapters.clear()
    await wait(lambda: set(engines[1].adapters) == {"sum", "tldr"}, what="restarted replica reloaded")
    # Hub adapters: loaded by repo id; a failing load is reported per pod.
    await cluster.update_spec("ml", "demo", {"adapters": [{"name": "chat", "hub": {"repo": "org/chat-lora"}},
                                                          {"name": "broken", "hub": {"repo": "org/missing"}}]})
    for e in engines:
        e.fail_load.add("broken")
    await wait(lambda: all(e.adapters == {"chat": "org/chat-lora"} for e in engines), what="chat only")
    await wait(lambda: cluster.condition("ml", "demo", "AdaptersReady").get("reason") == "AdaptersLoading",
               what="AdaptersReady False")
    await wait(lambda: "broken" in cluster.condition("ml", "demo", "AdaptersReady").get("message", "")
               and "404" in cluster.condition("ml", "demo", "AdaptersReady")["message"])


async def test_hub_adapters_come_and_go_without_a_new_template(cluster, make_body, wait):
    await cluster.apply_is(make_body(engine={"maxLoras": 2}))
    dep = await wait(lambda: cluster.get("Deployment", "ml", "demo"))
    template_hash = workload.template_hash(dep)
    (engine,) = [await cluster.start_pod("ml", "demo", 0, "tiny")]
    await cluster.update_spec("ml", "demo", {"adapters": [{"name": "chat", "hub": {"repo": "org/chat-lora"}}]})
    await wait(lambda: engine.adapters == {"chat": "org/chat-lora"}, what="chat loaded")
    await cluster.update_spec("ml", "demo", {"adapters": []})
    await wait(lambda: engine.adapters == {}, what="chat unloaded")
    await wait(lambda: cluster.status("ml", "demo").get("adapters") == [])
    assert workload.template_hash(cluster.get("Deployment", "ml", "demo")) == template_hash


async def test_invalid_spec_is_reported_without_a_hot_loop(cluster, make_body, wait):
    await cluster.apply_is(make_body(autoscaling={"minReplicas": 3, "maxReplicas": 1}))
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "InvalidSpec", what="InvalidSpec")
    assert "minReplicas must be <= maxReplicas" in cluster.condition("ml", "demo", "Ready")["message"]
    await wait(lambda: any(r.data and r.data.get("reason") == "InvalidSpec" for r in cluster.requests("POST", "/events")),
               what="a Warning Event")
    await asyncio.sleep(1.5)  # several resync periods
    assert cluster.metrics.reconciliations.labels("create", "invalid")._value.get() == 1  # PermanentError: no retry
    assert cluster.get("Deployment", "ml", "demo") is None
    # Fixing the spec recovers.
    await cluster.update_spec("ml", "demo", {"autoscaling": {"minReplicas": 1, "maxReplicas": 3}})
    await wait(lambda: cluster.get("Deployment", "ml", "demo"), what="Deployment after the fix")
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") != "InvalidSpec")


async def test_conflict_on_create_adopts(cluster, make_body, wait):
    # A Service with our name exists (e.g. created by a previous run that crashed before recording
    # it), but the first read misses it: the create gets 409 and the operator adopts the object.
    await cluster.create("v1/services", {"apiVersion": "v1", "kind": "Service", "metadata": {
        "name": "demo", "namespace": "ml"}, "spec": {"ports": [{"name": "http", "port": 80}]}})
    misses = [1]

    def miss_once(request):
        if misses[0] > 0:
            misses[0] -= 1
            return cluster.k.KubernetesNotFoundError() if hasattr(cluster.k, "KubernetesNotFoundError") else _not_found()
        return None

    cluster.k["get /api/v1/namespaces/ml/services/demo"] << miss_once
    await cluster.apply_is(make_body())
    svc = await wait(lambda: (s := cluster.get("Service", "ml", "demo")) and owned(s) and s, what="adopted Service")
    assert svc["spec"]["ports"][0]["port"] == 8000
    assert misses[0] == 0 and len(cluster.requests("POST", "/services")) == 2  # ours (409) + the test's


def _not_found():
    import kmock

    return kmock.KubernetesNotFoundError()


async def test_server_errors_are_retried(cluster, make_body, wait):
    import kmock

    failures = [3]

    def fail(request):
        if failures[0] > 0:
            failures[0] -= 1
            status = 503 if failures[0] == 1 else 500  # 500, 503, 500
            return kmock.KubernetesError(status=status, reason="InternalError", message="etcd is sad")
        return None

    cluster.k["get /apis/apps/v1/namespaces/ml/deployments/demo"] << fail
    await cluster.apply_is(make_body())
    await wait(lambda: cluster.get("Deployment", "ml", "demo"), timeout=30, what="Deployment after retries")
    assert failures[0] == 0
    # Every injected 5xx surfaced as a counted API error (retried), none was swallowed.
    counted = sum(cluster.metrics.registry.get_sample_value(
        "pageant_operator_reconcile_errors_total", {"handler": h, "reason": "api_error"}) or 0
        for h in ("create", "resync"))
    assert counted == 3
    await wait(lambda: cluster.metrics.registry.get_sample_value(
        "pageant_operator_reconciliations_total", {"handler": "create", "result": "success"}), what="create success")


async def test_forbidden_is_shown_in_status(cluster, make_body, wait):
    import kmock

    forbidden = [True]

    def deny(request):
        if forbidden[0]:
            return kmock.KubernetesError(status=403, reason="Forbidden",
                                         message='networkpolicies "demo" is forbidden: User "system:serviceaccount:pageant:operator" cannot get resource')
        return None

    cluster.k["get /apis/networking.k8s.io/v1/namespaces/ml/networkpolicies/demo"] << deny
    await cluster.apply_is(make_body())
    await wait(lambda: cluster.condition("ml", "demo", "Degraded").get("reason") == "Forbidden", what="Forbidden")
    message = cluster.condition("ml", "demo", "Degraded")["message"]
    assert "NetworkPolicy" in message and "403" in message
    forbidden[0] = False  # RBAC fixed
    await wait(lambda: cluster.condition("ml", "demo", "Degraded").get("reason") == "AsExpected", timeout=20)
    assert cluster.get("NetworkPolicy", "ml", "demo")


async def test_optional_apis_and_pruning(cluster, make_body, wait):
    body = make_body(autoscaling={"minReplicas": 0, "maxReplicas": 2}, monitoring={})
    await cluster.apply_is(body)
    # KEDA and the Prometheus Operator are not installed: reported, not fatal.
    await wait(lambda: "ScaledObjectAPIMissing" in cluster.condition("ml", "demo", "Degraded").get("reason", ""))
    assert "ServiceMonitor" in cluster.condition("ml", "demo", "Degraded")["message"]
    assert cluster.get("Deployment", "ml", "demo")["spec"]["replicas"] == 1
    # Switching to HPA creates the HPA; dropping autoscaling prunes it.
    await cluster.update_spec("ml", "demo", {"autoscaling": {"provider": "hpa", "minReplicas": 1, "maxReplicas": 2},
                                             "monitoring": None})
    hpa = await wait(lambda: cluster.get("HorizontalPodAutoscaler", "ml", "demo"), what="HPA")
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "InferenceService"
    await wait(lambda: cluster.condition("ml", "demo", "Degraded").get("reason") == "AsExpected")
    await cluster.update_spec("ml", "demo", {"autoscaling": None, "replicas": 1})
    await wait(lambda: cluster.get("HorizontalPodAutoscaler", "ml", "demo") is None, what="HPA pruned")


async def test_deletion_leaves_nothing(cluster, make_body, wait):
    await cluster.apply_is(make_body(engine={"maxLoras": 2}))
    await wait(lambda: cluster.get("Deployment", "ml", "demo") and cluster.get("ConfigMap", "ml", "demo-adapters"))
    await wait(lambda: cluster.metrics.managed._value.get() == 1)
    # kopf's finalizer (it runs the resync timer) is on the object until the operator releases it.
    assert "pageant.dev/finalizer" in cluster.get(IS, "ml", "demo")["metadata"]["finalizers"]
    children = [o.raw for (res, ns, name), o in list(cluster.k.objects.items())
                if ns == "ml" and not o.deleted and res.plural not in ("inferenceservices", "pods", "events")]
    assert children and all(owned(c) for c in children)  # so the API server's GC deletes them all
    await cluster.delete(IS, "ml", "demo")
    await wait(lambda: cluster.get(IS, "ml", "demo") is None, what="InferenceService gone (finalizer released)")
    await wait(lambda: cluster.metrics.managed._value.get() == 0)
    # The API server's garbage collector deletes the dependents of the gone owner (by uid)...
    collected = await cluster.garbage_collect()
    assert sorted(collected) == sorted(f"{c['kind']}/{c['metadata']['name']}" for c in children)
    # ...and the operator does not bring any of them back.
    posts = len(cluster.requests("POST", "/namespaces/ml/"))
    await asyncio.sleep(1.0)  # several resync periods
    assert len(cluster.requests("POST", "/namespaces/ml/")) == posts
    left = [(res.plural, name) for (res, ns, name), o in list(cluster.k.objects.items())
            if ns == "ml" and not o.deleted and res.plural not in ("events",)]
    assert left == []


async def test_keda_and_monitors_once_their_crds_exist(cluster, make_body, wait, validate_manifest):
    await cluster.apply_is(make_body(autoscaling={"minReplicas": 0, "maxReplicas": 3}, monitoring={"kind": "PodMonitor"}))
    await wait(lambda: "ScaledObjectAPIMissing" == cluster.condition("ml", "demo", "Degraded").get("reason"))
    cluster.install("ScaledObject")
    cluster.install("PodMonitor")
    so = await wait(lambda: cluster.get("ScaledObject", "ml", "demo"), what="ScaledObject")
    pm = await wait(lambda: cluster.get("PodMonitor", "ml", "demo"), what="PodMonitor")
    for obj in (so, pm):
        assert owned(obj)
        validate_manifest(_clean(obj))
    # KEDA without its HTTP add-on: nothing could wake the service, so it does not idle, and says so.
    await wait(lambda: cluster.condition("ml", "demo", "Degraded").get("reason") == "ScaleFromZeroUnavailable")
    assert "idleReplicaCount" not in so["spec"] and cluster.get("InterceptorRoute", "ml", "demo") is None
    assert cluster.status("ml", "demo")["url"] == "http://demo.ml.svc.cluster.local:8000/v1"
    cluster.install("InterceptorRoute")  # the add-on arrives: idle to zero, wake through it
    route = await wait(lambda: cluster.get("InterceptorRoute", "ml", "demo"), what="InterceptorRoute")
    validate_manifest(_clean(route))
    so = await wait(lambda: (o := cluster.get("ScaledObject", "ml", "demo")) and "idleReplicaCount" in o["spec"] and o)
    assert so["spec"]["idleReplicaCount"] == 0 and so["spec"]["triggers"][1]["type"] == "external-push"
    await wait(lambda: cluster.condition("ml", "demo", "Degraded").get("reason") == "AsExpected")
    await wait(lambda: cluster.status("ml", "demo").get("url") == "http://demo-wake.ml.svc.cluster.local:8080/v1")
    # KEDA drives the scale subresource: spec.replicas flows down to the Deployment.
    await cluster.patch(IS, "ml", "demo", {"spec": {"replicas": 2}})
    await wait(lambda: cluster.get("Deployment", "ml", "demo")["spec"]["replicas"] == 2, what="scaled to 2")
    await wait(lambda: cluster.status("ml", "demo").get("desiredReplicas") == 2)


def _clean(obj: dict) -> dict:
    """A live object as the builder wrote it (no status, no server-set metadata)."""
    return {k: v for k, v in obj.items() if k != "status"} | {"metadata": {
        k: v for k, v in obj["metadata"].items() if k not in ("resourceVersion", "uid", "generation")}}


async def test_model_cache_pvc_and_download_job(cluster, make_body, wait):
    await cluster.apply_is(make_body(model={"name": "tiny", "cache": {"repo": "org/tiny", "size": "10Gi"}}))
    pvc = await wait(lambda: cluster.get("PersistentVolumeClaim", "ml", "demo-model-cache"), what="cache PVC")
    job = await wait(lambda: cluster.get("Job", "ml", "demo-model-download"), what="download Job")
    assert owned(pvc) and owned(job)
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "ModelDownloading")
    # Created once: the (immutable) Job is never patched, even when it drifts from the spec.
    await cluster.patch("batch/v1/jobs", "ml", "demo-model-download", {"status": {"succeeded": 1}})
    await wait(lambda: cluster.condition("ml", "demo", "Ready").get("reason") == "ModelLoading")
    assert len(cluster.requests("PATCH", "/jobs/demo-model-download")) == 1  # only the test's
    await cluster.patch("batch/v1/jobs", "ml", "demo-model-download", {"status": {
        "succeeded": 0, "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}})
    await wait(lambda: cluster.condition("ml", "demo", "Degraded").get("reason") == "ModelDownloadFailed")
