"""Tensor and pipeline parallelism and multi-node replicas: the spec's layout rules (schema, CEL and
the Python parser agree), GPUs per pod, the engine flags, and the LeaderWorkerSet a multi-node
service renders instead of a Deployment (pure builders; the kopf loop is in cluster/)."""

from __future__ import annotations

import copy
import re

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pageant.operator import reconcile, render, schema, spec, status
from pageant.operator.builders import autoscale, common, multinode, workload
from tests.conftest import require_schemas_dir
from tests.operator.test_cel import cel_violations

LEADER = {common.LWS_WORKER_INDEX_LABEL: "0"}
SELECTOR = {"pageant.dev/inferenceservice": "demo", "app.kubernetes.io/component": "engine"}


def _kids(body) -> dict[str, dict]:
    return {c.kind: c.manifest for c in reversed(render.children(spec.parse(body)))}


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def _layout(tp=None, pp=None, nodes=None, **extra) -> dict:
    engine = {k: v for k, v in (("tensorParallelSize", tp), ("pipelineParallelSize", pp), ("nodes", nodes))
              if v is not None}
    return {"engine": engine, **extra}


def _gpus(container: dict) -> str | None:
    return (container["resources"].get("limits") or {}).get("nvidia.com/gpu")


# (spec fragment, GPUs per pod, --tensor-parallel-size, --pipeline-parallel-size)
SINGLE_NODE = [
    ({}, "1", None, None),                                                  # no layout: as before
    (_layout(tp=4), "4", "4", None),                                        # GPUs follow tp
    (_layout(tp=2, pp=2), "4", "2", "2"),                                   # and tp x pp
    (_layout(tp=2, resources={"memory": "64Gi"}), "2", "2", None),          # resources without gpus
    (_layout(tp=2, resources={"gpus": 4}), "4", "2", None),                 # explicit and enough
    (_layout(pp=1, resources={"gpus": 0}), None, None, "1"),                # one rank on CPU
]


@pytest.mark.parametrize("fragment,gpus,tp,pp", SINGLE_NODE)
def test_tp_pp_flags_and_gpu_limits(make_body, validate_manifest, fragment, gpus, tp, pp):
    kids = _kids(make_body(**fragment))
    assert "LeaderWorkerSet" not in kids
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert _gpus(c) == gpus
    assert (_flag(c["args"], "--tensor-parallel-size"), _flag(c["args"], "--pipeline-parallel-size")) == (tp, pp)
    assert ("--device" in c["args"]) is (gpus is not None)
    assert not {"--nnodes", "--node-rank", "--master-addr", "--headless"} & set(c["args"])
    # NCCL and the engine's ranks share memory through /dev/shm: always a memory-backed emptyDir.
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    validate_manifest(kids["Deployment"])


def test_a_spec_without_the_layout_renders_as_before(make_body):
    """Nothing new is rendered for an old spec (same args, same template hash), so upgrading the
    operator rolls no pods; the CRD has no default that would add the fields to stored objects."""
    body = make_body(resources={"gpus": 1}, engine={"maxModelLen": 1024})
    assert workload.pod_template(spec.parse(body)) == workload.pod_template(spec.parse(make_body(
        engine={"maxModelLen": 1024})))
    engine_props = schema.openapi_schema()["properties"]["spec"]["properties"]["engine"]["properties"]
    resources = schema.openapi_schema()["properties"]["spec"]["properties"]["resources"]["properties"]
    assert not [k for k in ("tensorParallelSize", "pipelineParallelSize", "nodes") if "default" in engine_props[k]]
    assert "default" not in resources["gpus"]


BAD = [
    (_layout(tp=4, resources={"gpus": 2}), "cannot hold its 4 ranks", "must hold the ranks"),
    (_layout(tp=2, pp=2, resources={"gpus": 3}), "cannot hold its 4 ranks", "must hold the ranks"),
    (_layout(tp=8, pp=2, nodes=2, resources={"gpus": 4}), "cannot hold its 8 ranks", "must hold the ranks"),
    (_layout(tp=2, resources={"gpus": 0}), "cannot hold its 2 ranks", "must hold the ranks"),
    (_layout(tp=4, nodes=3), "must be a multiple of nodes", "must be a multiple of nodes"),
    (_layout(nodes=2), "must be a multiple of nodes", "must be a multiple of nodes"),   # 1 rank, 2 nodes
]
GOOD = [_layout(tp=8, pp=2, nodes=2), _layout(tp=8, pp=2, nodes=2, resources={"gpus": 8}),
        _layout(tp=4, nodes=4), _layout(tp=2, pp=2, resources={"gpus": 8}), _layout(tp=1, pp=1, nodes=1)]


@pytest.mark.parametrize("fragment,parser_says,cel_says", BAD)
def test_layouts_the_gpus_cannot_hold_are_refused_by_cel_and_the_parser(make_body, our_validator, fragment,
                                                                       parser_says, cel_says):
    body = make_body(**fragment)
    our_validator.validate(body)  # structurally fine: only the cross-field rules can tell
    assert any(cel_says in v for v in cel_violations(body)), cel_violations(body)
    with pytest.raises(spec.InvalidSpec, match=parser_says) as info:
        spec.parse(body)
    assert "tensorParallelSize" in str(info.value) and "pipelineParallelSize" in str(info.value)


@pytest.mark.parametrize("fragment", GOOD)
def test_layouts_that_fit_pass_cel_and_the_parser(make_body, our_validator, fragment):
    body = make_body(**fragment)
    our_validator.validate(body)
    assert cel_violations(body) == []
    layout = spec.parse(body).parallel
    assert layout.world_size % layout.nodes == 0


@pytest.mark.parametrize("key", ["tensorParallelSize", "pipelineParallelSize", "nodes"])
def test_sizes_below_one_are_refused_by_the_schema_and_the_parser(make_body, our_validator, key):
    body = make_body(engine={key: 0})
    with pytest.raises(jsonschema.ValidationError):
        our_validator.validate(body)
    with pytest.raises(spec.InvalidSpec, match=f"spec.engine.{key}: must be >= 1"):
        spec.parse(body)


def test_a_multinode_name_leaves_room_for_the_statefulsets(make_body):
    body = make_body(**_layout(tp=2, nodes=2))
    body["metadata"]["name"] = "n" * 46  # + "-lws-0" = 52: the StatefulSet name limit
    assert spec.parse(body).parallel.nodes == 2
    body["metadata"]["name"] = "n" * 47
    with pytest.raises(spec.InvalidSpec, match="at most 46"):
        spec.parse(body)
    body["metadata"]["name"] = "n" * 46
    body["spec"]["autoscaling"] = {"maxReplicas": 12}  # group index 11: two digits
    with pytest.raises(spec.InvalidSpec, match="at most 45.*controller-revision-hash"):
        spec.parse(body)
    body["spec"]["engine"] = {}  # a single-node service keeps the 52-character limit
    assert spec.parse(body).name == "n" * 46


MULTINODE = {2: _layout(tp=8, pp=2, nodes=2, replicas=3), 4: _layout(tp=4, pp=4, nodes=4, replicas=1)}


@pytest.mark.parametrize("nodes", sorted(MULTINODE))
def test_multinode_renders_a_leader_worker_set(make_body, validate_manifest, nodes):
    kids = _kids(make_body(**MULTINODE[nodes]))
    assert "Deployment" not in kids
    lws = kids["LeaderWorkerSet"]
    validate_manifest(lws)
    assert (lws["apiVersion"], lws["metadata"]["name"]) == ("leaderworkerset.x-k8s.io/v1", "demo-lws")
    s, lwt = lws["spec"], lws["spec"]["leaderWorkerTemplate"]
    assert (s["replicas"], lwt["size"], lwt["restartPolicy"]) == (MULTINODE[nodes]["replicas"], nodes,
                                                                   "RecreateGroupOnPodRestart")
    assert s["startupPolicy"] == "LeaderCreated"  # the leader is ready only once every rank joined
    assert s["rolloutStrategy"]["rollingUpdateConfiguration"] == {"maxUnavailable": 1, "maxSurge": 0}
    (leader,) = lwt["leaderTemplate"]["spec"]["containers"]
    (worker,) = lwt["workerTemplate"]["spec"]["containers"]
    for c in (leader, worker):
        assert _gpus(c) == ("8" if nodes == 2 else "4")  # 16 ranks over `nodes` pods
        assert (_flag(c["args"], "--tensor-parallel-size"), _flag(c["args"], "--pipeline-parallel-size")) == (
            ("8", "2") if nodes == 2 else ("4", "4"))
        assert (_flag(c["args"], "--nnodes"), _flag(c["args"], "--master-addr"), _flag(c["args"], "--master-port")
                ) == (str(nodes), "$(LWS_LEADER_ADDRESS)", "29500")
        assert _flag(c["args"], "--model") == "org/tiny-model" and c["command"] == ["pageant", "serve"]
    assert _flag(leader["args"], "--node-rank") == "0" and "--headless" not in leader["args"]
    assert _flag(worker["args"], "--node-rank") == "$(LWS_WORKER_INDEX)" and "--headless" in worker["args"]
    assert [p["name"] for p in leader["ports"]] == ["http", "rendezvous"] and "ports" not in worker
    assert {"startupProbe", "readinessProbe", "livenessProbe", "lifecycle"} <= set(leader)
    assert not {"startupProbe", "readinessProbe", "livenessProbe", "lifecycle"} & set(worker)
    for role in ("leaderTemplate", "workerTemplate"):
        tmpl = lwt[role]
        assert SELECTOR.items() <= tmpl["metadata"]["labels"].items()
        assert common.CONFIG_HASH_ANNOTATION in tmpl["metadata"]["annotations"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}} in tmpl["spec"]["volumes"]
    # The API is the leaders': the Service, and the scale subresource's selector (per-pod metrics).
    assert kids["Service"]["spec"]["selector"] == {**SELECTOR, **LEADER}
    st = status.compute(spec.parse(make_body(**MULTINODE[nodes])), status.Observed(), None)
    assert st["selector"] == ("app.kubernetes.io/component=engine,leaderworkerset.sigs.k8s.io/worker-index=0,"
                              "pageant.dev/inferenceservice=demo")
    # The group's pods reach each other on every port (rendezvous, NCCL); others only on the API.
    ingress = kids["NetworkPolicy"]["spec"]["ingress"]
    assert ingress == [{"ports": [{"protocol": "TCP", "port": 8000}]},
                       {"from": [{"podSelector": {"matchLabels": SELECTOR}}]}]
    validate_manifest(kids["NetworkPolicy"])


def test_the_lws_validation_is_not_vacuous(make_body, validate_manifest):
    lws = _kids(make_body(**MULTINODE[2]))["LeaderWorkerSet"]
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Sometimes"
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(bad)
    bad = copy.deepcopy(lws)
    bad["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(bad)


def _strict(node):
    """A CRD schema as structural pruning reads it: objects that list their properties keep no others."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    return [_strict(x) for x in node] if isinstance(node, list) else node


def test_the_api_server_prunes_nothing_from_the_lws(make_body):
    """Every field rendered is in LWS's CRD schema: none is pruned on write, so the live object
    matches the manifest and the operator does not patch it again on every pass."""
    folder = require_schemas_dir("leaderworkerset.x-k8s.io_leaderworkersets.yaml")
    crd = yaml.safe_load((folder / "leaderworkerset.x-k8s.io_leaderworkersets.yaml").read_text())
    validator = jsonschema.Draft4Validator(_strict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]))
    body = make_body(**{**MULTINODE[2], "engine": {**MULTINODE[2]["engine"], "maxLoras": 2, "apiKeySecretRef": {
        "name": "key"}}}, model={"name": "m", "cache": {"repo": "o/m", "size": "1Gi"}},
        adapters=[{"name": "a", "pvc": {"claimName": "loras"}}], serviceAccountName="sa",
        resources={"cpu": "4", "memory": "64Gi"}, scheduling={
            "nodeSelector": {"gpu": "h100"}, "tolerations": [{"key": "k", "operator": "Exists"}],
            "priorityClassName": "high", "runtimeClassName": "nvidia"})
    lws = _kids(body)["LeaderWorkerSet"]
    assert [e.message for e in validator.iter_errors(lws)] == []
    lws["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"][0]["bogus"] = 1
    assert ["bogus" in e.message for e in validator.iter_errors(lws)] == [True]


def test_monitoring_routing_and_adapters_use_the_leaders(make_body, validate_manifest):
    body = make_body(**{**MULTINODE[2], "engine": {**MULTINODE[2]["engine"], "maxLoras": 2}},
                     monitoring={"kind": "PodMonitor"}, adapters=[{"name": "a", "pvc": {"claimName": "loras"}}],
                     routing={"inferencePool": {"enabled": True, "gateway": {"name": "gw"}}})
    kids = _kids(body)
    assert kids["PodMonitor"]["spec"]["selector"]["matchLabels"] == {**SELECTOR, **LEADER}
    assert kids["InferencePool"]["spec"]["selector"]["matchLabels"] == {**SELECTOR, **LEADER}
    lwt = kids["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    for role in ("leaderTemplate", "workerTemplate"):  # every rank loads the adapters' weights
        mounts = {m["mountPath"] for m in lwt[role]["spec"]["containers"][0]["volumeMounts"]}
        assert {"/etc/pageant/adapters", "/adapters/loras"} <= mounts
    for kind in ("PodMonitor", "InferencePool", "ConfigMap"):
        validate_manifest(kids[kind])
    sm = _kids(make_body(**MULTINODE[2], monitoring={}))["ServiceMonitor"]
    assert sm["spec"]["selector"]["matchLabels"] == SELECTOR  # it selects the Service, by its labels


def test_autoscalers_scale_groups_through_the_inference_service(make_body):
    """KEDA and HPA drive the InferenceService's scale subresource, as for a Deployment; the operator
    copies spec.replicas (groups) into the LeaderWorkerSet, its one writer."""
    for auto in ({"maxReplicas": 4}, {"provider": "hpa", "maxReplicas": 4}):
        kids = _kids(make_body(**MULTINODE[2], autoscaling=auto))
        scaler = kids.get("ScaledObject") or kids["HorizontalPodAutoscaler"]
        assert scaler["spec"]["scaleTargetRef"] == autoscale._scale_target(spec.parse(make_body()))
        assert kids["LeaderWorkerSet"]["spec"]["replicas"] == 3


def test_switching_nodes_swaps_the_workload_kind(make_body):
    one = {c.kind for c in render.children(spec.parse(make_body(**_layout(tp=8, pp=2))))}
    two = {c.kind for c in render.children(spec.parse(make_body(**MULTINODE[2])))}
    assert ("Deployment" in one, "LeaderWorkerSet" in one) == (True, False)
    assert ("Deployment" in two, "LeaderWorkerSet" in two) == (False, True)
    assert {"Deployment", "LeaderWorkerSet"} <= set(render.PRUNABLE_KINDS)  # the unwanted one is pruned
    (lws,) = [c for c in render.children(spec.parse(make_body(**MULTINODE[2]))) if c.kind == "LeaderWorkerSet"]
    assert lws.optional_api == "leaderworkerset.x-k8s.io/v1"


def test_owned_maps_drop_keys_the_manifest_no_longer_has():
    want = {"spec": {"selector": {"a": "1"}, "ports": []}}
    have = {"spec": {"selector": {"a": "1", common.LWS_WORKER_INDEX_LABEL: "0"}, "type": "ClusterIP"}}
    assert reconcile.removals(want, have, (render.SELECTOR,)) == {
        "spec": {"selector": {common.LWS_WORKER_INDEX_LABEL: None}}}
    assert reconcile.removals(want, {"spec": {"selector": {"a": "1"}}}, (render.SELECTOR,)) == {}
    assert reconcile.removals(want, {"spec": {}}, (render.SELECTOR,)) == {}


def _lws_live(replicas=2, ready=0, updated=None, generation=1, observed=1, conditions=()):
    return {"metadata": {"name": "demo-lws", "generation": generation},
            "status": {"replicas": replicas, "readyReplicas": ready, "observedGeneration": observed,
                       "updatedReplicas": replicas if updated is None else updated, "conditions": list(conditions)}}


def _pod(name, leader, ready=True):
    labels = {**SELECTOR, common.LWS_WORKER_INDEX_LABEL: "0" if leader else "1"}
    return {"metadata": {"name": name, "labels": labels}, "status": {
        "phase": "Running", "podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": str(ready)}]}}


def _cond(st, type_):
    return next(c for c in st["conditions"] if c["type"] == type_)


def test_status_comes_from_the_leader_worker_set(make_body):
    s = spec.parse(make_body(**_layout(tp=2, nodes=2, replicas=2)))
    st = status.compute(s, status.Observed(), None)
    assert _cond(st, "Ready")["reason"] == "LeaderWorkerSetMissing"
    missing = status.Observed(problems=[("LeaderWorkerSetAPIMissing", "LeaderWorkerSet not served: install it")])
    st = status.compute(s, missing, None)
    assert (_cond(st, "Ready")["reason"], _cond(st, "Degraded")["reason"]) == ("LeaderWorkerSetAPIMissing",) * 2
    st = status.compute(s, status.Observed(lws=_lws_live(2, 1)), None)
    assert (st["replicas"], st["readyReplicas"], st["desiredReplicas"]) == (2, 1, 2)  # groups, not pods
    assert _cond(st, "Ready")["reason"] == "PartiallyReady" and _cond(st, "Progressing")["status"] == "True"
    st = status.compute(s, status.Observed(lws=_lws_live(2, 2)), None)
    assert _cond(st, "Ready")["reason"] == "AllReplicasReady" and _cond(st, "Progressing")["reason"] == "Stable"
    rolling = _lws_live(2, 2, conditions=[{"type": "UpdateInProgress", "status": "True"}])
    assert _cond(status.compute(s, status.Observed(lws=rolling), None), "Progressing")["reason"] == "RollingOut"
    assert st["configHash"] == multinode.template_hash(multinode.leader_worker_set(s))
    # A worker that crash-loops is the group's problem.
    crashing = _pod("demo-lws-0-1", leader=False, ready=False)
    crashing["status"]["containerStatuses"] = [{"name": "engine", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]
    st = status.compute(s, status.Observed(lws=_lws_live(2, 0), pods=[crashing]), None)
    assert _cond(st, "Ready")["reason"] == "CrashLoop" and "demo-lws-0-1" in _cond(st, "Degraded")["message"]


def test_adapters_are_counted_on_leaders_only(make_body):
    s = spec.parse(make_body(**_layout(tp=2, nodes=2, replicas=1), adapters=[{"name": "a", "hub": {"repo": "o/a"}}]))
    pods = [_pod("demo-lws-0", leader=True), _pod("demo-lws-0-1", leader=False)]
    st = status.compute(s, status.Observed(lws=_lws_live(1, 1), pods=pods, adapter_counts={"a": 1}), None)
    assert st["adapters"] == [{"name": "a", "readyReplicas": 1, "state": "Loaded"}]
    assert "all 1 ready replicas" in _cond(st, "AdaptersReady")["message"]


def _kubelet_expand(args: list[str], env: dict[str, str]) -> list[str]:
    """kubelet's $(VAR) expansion of container args from the container's env."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in args]


@pytest.mark.parametrize("nodes", sorted(MULTINODE))
def test_engine_accepts_every_pods_args(make_body, nodes):
    """Contract with the engine: its parser and EngineConfig take each pod's args as kubelet
    expands them with the env LeaderWorkerSet sets (node ranks 0..nodes-1, one rendezvous)."""
    from pageant.engine import EngineConfig  # test-only: the operator never imports the engine
    from pageant.engine.server.cli import build_parser
    from pageant.engine.server.cli_args import engine_kwargs

    lwt = _kids(make_body(**MULTINODE[nodes]))["LeaderWorkerSet"]["spec"]["leaderWorkerTemplate"]
    seen = set()
    for worker in range(nodes):
        tmpl = lwt["leaderTemplate" if worker == 0 else "workerTemplate"]
        env = {"LWS_LEADER_ADDRESS": "demo-lws-0.demo-lws.ml", "LWS_WORKER_INDEX": str(worker)}
        args = build_parser().parse_args(_kubelet_expand(tmpl["spec"]["containers"][0]["args"], env))
        args.dtype = "bfloat16"  # `pageant serve` resolves auto from the checkpoint before this
        config = EngineConfig(model="/models/m", **engine_kwargs(args))
        assert args.headless is (worker > 0) and args.port == 8000
        assert (config.nnodes, config.node_rank, config.world_size) == (nodes, worker, 16)
        assert (config.master_addr, config.master_port) == ("demo-lws-0.demo-lws.ml", 29500)
        seen.add(config.node_rank)
    assert seen == set(range(nodes))
