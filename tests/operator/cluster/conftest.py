"""The kopf-operator harness: kmock (kopf's mock Kubernetes API) made a little more like a real API
server, fake engine pods on loopback, and the operator running in its own thread."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import re
import threading
import time

import aiohttp
import attrs
import kmock
import kopf
import pytest
import pytest_asyncio
from aiohttp import web

CHILD_RESOURCES = {
    "Deployment": "apps/v1/deployments", "Service": "v1/services", "ConfigMap": "v1/configmaps",
    "Pod": "v1/pods", "Event": "v1/events", "PodDisruptionBudget": "policy/v1/poddisruptionbudgets",
    "NetworkPolicy": "networking.k8s.io/v1/networkpolicies", "Job": "batch/v1/jobs",
    "HorizontalPodAutoscaler": "autoscaling/v2/horizontalpodautoscalers",
    "PersistentVolumeClaim": "v1/persistentvolumeclaims", "ServiceAccount": "v1/serviceaccounts",
    "Role": "rbac.authorization.k8s.io/v1/roles", "RoleBinding": "rbac.authorization.k8s.io/v1/rolebindings",
}
OPTIONAL_RESOURCES = {"ScaledObject": "keda.sh/v1alpha1/scaledobjects",
                      "ServiceMonitor": "monitoring.coreos.com/v1/servicemonitors",
                      "PodMonitor": "monitoring.coreos.com/v1/podmonitors",
                      "InterceptorRoute": "http.keda.sh/v1beta1/interceptorroutes",
                      "InferencePool": "inference.networking.k8s.io/v1/inferencepools",
                      "HTTPRoute": "gateway.networking.k8s.io/v1/httproutes",
                      "LeaderWorkerSet": "leaderworkerset.x-k8s.io/v1/leaderworkersets"}
IS_RESOURCE = "pageant.dev/v1alpha1/inferenceservices"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


QUALIFIED_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                           r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


def _check_metadata_keys(data) -> None:
    """Reject label/annotation keys a real API server would reject (422)."""
    keys: list[str] = []
    if isinstance(data, dict):
        meta = data.get("metadata") or {}
        keys = list((meta.get("labels") or {}).keys()) + list((meta.get("annotations") or {}).keys())
    elif isinstance(data, list):
        for op in data:
            path = op.get("path", "")
            for prefix in ("/metadata/annotations/", "/metadata/labels/"):
                if path.startswith(prefix):
                    keys.append(path[len(prefix):].replace("~1", "/").replace("~0", "~"))
                elif path in (prefix.rstrip("/"),) and isinstance(op.get("value"), dict):
                    keys += list(op["value"])
    for key in keys:
        if not QUALIFIED_KEY.match(key) or len(key.split("/")[-1]) > 63:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=f"invalid metadata key {key!r}")


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator plus what a real API server adds and kopf relies on: a resourceVersion that
    changes on every write, metadata.generation bumped on spec changes, a uid on create."""

    _version: int = attrs.field(default=100, init=False)

    async def _handle(self, request):
        data = request.data
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            _check_metadata_keys(data)
            self._version += 1
            rv = str(self._version)
            if isinstance(data, dict):
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = rv
                if request.action == kmock.action.CREATE:
                    meta.setdefault("uid", f"uid-{self._version}")
                    meta.setdefault("generation", 1)
                elif "spec" in data and request.subresource is None:
                    try:
                        current = self.objects[request.resource, request.namespace, request.name]
                        meta["generation"] = (current.get("metadata", {}).get("generation") or 1) + 1
                    except KeyError:
                        pass
            elif isinstance(data, list):
                # JSON patch with kopf's optimistic "test" of resourceVersion: 422 when stale.
                try:
                    current = self.objects[request.resource, request.namespace, request.name]
                    current_rv = None if current.deleted else current.get("metadata", {}).get("resourceVersion")
                except KeyError:
                    current_rv = None
                for op in data:
                    if op.get("op") == "test" and op.get("path") == "/metadata/resourceVersion" \
                            and current_rv is not None and op.get("value") != current_rv:
                        raise kmock.KubernetesError(status=422, reason="Invalid",
                                                    message="the object has been modified")
                data.append({"op": "add", "path": "/metadata/resourceVersion", "value": rv})
        return await super()._handle(request)


async def wait_until(predicate, timeout: float = 15.0, what: str = "condition"):
    """Poll predicate (sync or async) every 50 ms; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


class FakeEngine:
    """Stands in for one engine pod's API on 127.0.0.x: /v1/models and the LoRA endpoints."""

    def __init__(self, base_model: str):
        self.base_model = base_model
        self.adapters: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []
        self.fail_load: set[str] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/load_lora_adapter", self.load)
        app.router.add_post("/v1/unload_lora_adapter", self.unload)
        return app

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": self.base_model, "object": "model"}]
        data += [{"id": n, "object": "model", "parent": self.base_model, "root": p} for n, p in self.adapters.items()]
        return web.json_response({"object": "list", "data": data})

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("load", body["lora_name"]))
        if body["lora_name"] in self.fail_load:
            return web.json_response({"error": {"message": "no such adapter", "type": "NotFoundError"}}, status=404)
        self.adapters[body["lora_name"]] = body["lora_path"]
        return web.json_response({"status": "ok"})

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.calls.append(("unload", body["lora_name"]))
        if self.adapters.pop(body["lora_name"], None) is None:
            return web.json_response({"error": {"message": "not loaded"}}, status=404)
        return web.json_response({"status": "ok"})


class Cluster:
    """kmock + the running operator + helpers to act like kubectl and like the kubelet."""

    def __init__(self, emulator, url: str, metrics, session: aiohttp.ClientSession):
        self.k, self.url, self.metrics, self.session = emulator, url, metrics, session
        self.engines: dict[str, FakeEngine] = {}
        self.pod_port = 0

    # kubectl-like calls over HTTP, so that kopf's watch streams see them.
    def _path(self, resource: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        group_version, plural = resource.rsplit("/", 1)
        prefix = "/api/" if group_version == "v1" else "/apis/"
        path = f"{prefix}{group_version}/namespaces/{namespace}/{plural}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def create(self, resource: str, obj: dict) -> dict:
        ns = obj["metadata"]["namespace"]
        async with self.session.post(self.url + self._path(resource, ns), json=obj) as r:
            assert r.status in (200, 201), await r.text()
            return await r.json()

    async def patch(self, resource: str, ns: str, name: str, patch: dict, sub: str | None = None) -> dict:
        async with self.session.patch(self.url + self._path(resource, ns, name, sub), json=patch,
                                      headers={"Content-Type": "application/merge-patch+json"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()

    async def delete(self, resource: str, ns: str, name: str) -> None:
        async with self.session.delete(self.url + self._path(resource, ns, name)) as r:
            assert r.status == 200, await r.text()

    def get(self, kind_or_resource: str, ns: str, name: str) -> dict | None:
        resource = CHILD_RESOURCES.get(kind_or_resource) or OPTIONAL_RESOURCES.get(kind_or_resource) or kind_or_resource
        try:
            obj = self.k.objects[resource, ns, name]
        except KeyError:
            return None
        return None if obj.deleted else copy.deepcopy(obj.raw)

    async def garbage_collect(self) -> list[str]:
        """What kube-controller-manager's garbage collector does: delete every object whose owner
        (by uid) no longer exists. Returns "Kind/name" of what it deleted."""
        live_uids = {o.raw["metadata"].get("uid") for o in self.k.objects.values() if not o.deleted}
        deleted = []
        for (res, ns, name), obj in list(self.k.objects.items()):
            if obj.deleted:
                continue
            raw = obj.raw
            refs = raw["metadata"].get("ownerReferences") or []
            if refs and all(r["uid"] not in live_uids for r in refs):
                group_version = f"{res.group}/{res.version}" if res.group else res.version
                await self.delete(f"{group_version}/{res.plural}", ns, name)
                deleted.append(f"{raw.get('kind')}/{name}")
        return deleted

    def install(self, kind: str) -> None:
        """Install an optional API (as if its CRD were applied): KEDA, its HTTP add-on, the Prometheus
        Operator, Gateway API, the Inference Extension or LeaderWorkerSet."""
        self.k.resources[OPTIONAL_RESOURCES[kind]] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=VERBS,
                                                                        subresources={"status"})

    def requests(self, method: str, path_part: str) -> list:
        return [r for r in list(self.k) if str(getattr(r.method, "value", r.method)).upper() == method.upper()
                and path_part in r.url.path]

    async def apply_is(self, body: dict) -> dict:
        body = copy.deepcopy(body)
        return await self.create(IS_RESOURCE, body)

    async def update_spec(self, ns: str, name: str, spec_patch: dict) -> None:
        """Like kubectl patch --type merge (the emulator bumps metadata.generation)."""
        await self.patch(IS_RESOURCE, ns, name, {"spec": spec_patch})

    def status(self, ns: str, name: str) -> dict:
        return (self.get(IS_RESOURCE, ns, name) or {}).get("status") or {}

    def condition(self, ns: str, name: str, type_: str) -> dict:
        for c in self.status(ns, name).get("conditions") or []:
            if c["type"] == type_:
                return c
        return {}

    async def start_pod(self, ns: str, dep_name: str, index: int, base_model: str, ready: bool = True) -> FakeEngine:
        """What the Deployment controller and kubelet would do: a pod with the template's labels, an
        IP on loopback (127.0.0.<index+1>) where a fake engine answers."""
        dep = self.get("Deployment", ns, dep_name)
        ip = f"127.0.0.{index + 1}"
        engine = await self._engine_at(ip, base_model)
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": f"{dep_name}-pod-{index}", "namespace": ns,
                            "labels": dict(dep["spec"]["template"]["metadata"]["labels"]),
                            "annotations": dict(dep["spec"]["template"]["metadata"]["annotations"])},
               "spec": copy.deepcopy(dep["spec"]["template"]["spec"]),
               "status": {"phase": "Running", "podIP": ip,
                          "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
        await self.create("v1/pods", pod)
        return engine

    async def _engine_at(self, ip: str, base_model: str) -> FakeEngine:
        engine = self.engines.get(ip)
        if engine is None:
            engine = FakeEngine(base_model)
            runner = web.AppRunner(engine.app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, ip, self.pod_port).start()
            self._runners.append(runner)
            self.engines[ip] = engine
        return engine

    async def start_group_pod(self, ns: str, lws_name: str, group: int, worker: int, base_model: str,
                              ip: str, serve: bool | None = None) -> FakeEngine | None:
        """What the LeaderWorkerSet controller, its pod webhook and kubelet would do: pod
        <lws>-<group> (the leader, worker 0) or <lws>-<group>-<worker> from the matching template,
        with the labels and env LWS adds, Ready, at ``ip``. A fake engine answers there on the leader
        (workers are headless), or where ``serve`` says (to show that nothing calls a worker)."""
        lwt = self.get("LeaderWorkerSet", ns, lws_name)["spec"]["leaderWorkerTemplate"]
        tmpl = lwt["leaderTemplate" if worker == 0 else "workerTemplate"]
        name = f"{lws_name}-{group}" + (f"-{worker}" if worker else "")
        labels = {**tmpl["metadata"]["labels"], "leaderworkerset.sigs.k8s.io/name": lws_name,
                  "leaderworkerset.sigs.k8s.io/group-index": str(group),
                  "leaderworkerset.sigs.k8s.io/worker-index": str(worker)}
        pod_spec = copy.deepcopy(tmpl["spec"])
        lws_env = [{"name": "LWS_LEADER_ADDRESS", "value": f"{lws_name}-{group}.{lws_name}.{ns}"},
                   {"name": "LWS_GROUP_SIZE", "value": str(lwt["size"])},
                   {"name": "LWS_WORKER_INDEX", "value": str(worker)}]
        for c in pod_spec["containers"]:
            c["env"] = lws_env + c.get("env", [])
        engine = await self._engine_at(ip, base_model) if (worker == 0 if serve is None else serve) else None
        await self.create("v1/pods", {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels,
                         "annotations": dict(tmpl["metadata"]["annotations"])},
            "spec": pod_spec,
            "status": {"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}})
        return engine


@contextlib.asynccontextmanager
async def _kmock_api():
    """kmock with our CRD, a namespace `ml` and every child resource declared: (emulator, url)."""
    from pageant.operator import schema

    async with Emulator() as k, kmock.Server(k) as server:
        k.resources[IS_RESOURCE] = kmock.ResourceInfo(kind="InferenceService", namespaced=True,
                                                      subresources={"status", "scale"}, verbs=VERBS)
        k.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
            kind="CustomResourceDefinition", namespaced=False, verbs=VERBS)
        k.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=VERBS)
        for kind, res in CHILD_RESOURCES.items():
            k.resources[res] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=VERBS)
        k.objects["apiextensions.k8s.io/v1/customresourcedefinitions", None, schema.CRD_NAME] = schema.crd()
        k.objects["v1/namespaces", None, "ml"] = {"metadata": {"name": "ml"}}
        yield k, str(server.url).rstrip("/")


@pytest_asyncio.fixture
async def cluster_api():
    """kmock alone (no operator): (url, Cluster helper) for tests that run the operator themselves."""
    from pageant.operator.metrics import OperatorMetrics

    async with _kmock_api() as (k, url), aiohttp.ClientSession() as session:
        c = Cluster(k, url, OperatorMetrics(), session)
        c._runners = []
        yield url, c


@pytest_asyncio.fixture
async def cluster():
    """A kmock Kubernetes API with our CRD, the operator running in-process against it (resync
    every 0.3 s), and a fake-engine port on loopback. Everything is torn down, bounded in time."""
    from pageant.operator.config import OperatorConfig
    from pageant.operator.main import serve
    from pageant.operator.metrics import OperatorMetrics

    async with _kmock_api() as (k, url):
        # A free port, then the same port on 127.0.0.1 and 127.0.0.2 for fake pods.
        probe = web.AppRunner(web.Application())
        await probe.setup()
        site = web.TCPSite(probe, "127.0.0.1", 0)
        await site.start()
        pod_port = site._server.sockets[0].getsockname()[1]
        await probe.cleanup()

        config = OperatorConfig(connection=kopf.ConnectionInfo(server=url), metrics_port=None, health_port=None,
                                resync_seconds=0.3, pod_url_template=f"http://{{ip}}:{pod_port}",
                                pod_timeout_seconds=2.0, api_timeout_seconds=2.0,
                                discovery_ttl_seconds=0.2, adapter_retry_seconds=0.5)
        metrics = OperatorMetrics()
        # The operator runs in its own thread and event loop, as in production: kopf treats tasks
        # born during its run in its loop as its own (it would wait for kmock's server handlers).
        stop = threading.Event()
        thread = threading.Thread(target=lambda: asyncio.run(serve(config, metrics, stop_flag=stop)),
                                  name="operator", daemon=True)
        async with aiohttp.ClientSession() as session:
            c = Cluster(k, url, metrics, session)
            c.pod_port, c._runners = pod_port, []
            thread.start()
            try:
                yield c
            finally:
                stop.set()
                await asyncio.to_thread(thread.join, 20)
                assert not thread.is_alive(), "the operator did not stop within 20 s"
                for runner in c._runners:
                    await runner.cleanup()


@pytest.fixture
def wait():
    """wait(predicate, timeout=15, what=...): bounded polling for the kmock tests."""
    return wait_until
