"""Builders of the second wave: scale from zero through the KEDA HTTP add-on, Gateway routing
through an InferencePool and its endpoint picker. Every object passes its upstream schema."""

from __future__ import annotations

import pytest
import yaml

from pageant.operator import rbac, render, spec
from pageant.operator.builders import autoscale, common, routing, wake

SFZ = {"autoscaling": {"minReplicas": 0, "maxReplicas": 4}}
ROUTED = {"routing": {"inferencePool": {"enabled": True, "gateway": {"name": "inference-gw"}}}}


def _kids(body, wake_available=True) -> dict[tuple[str, str], dict]:
    return {(c.kind, c.name): c.manifest for c in render.children(spec.parse(body), wake_available)}


def test_scale_from_zero_renders_the_add_on_objects(make_body, validate_manifest):
    kids = _kids(make_body(**SFZ))
    for obj in kids.values():
        validate_manifest(obj)
    route = kids["InterceptorRoute", "demo"]
    assert route["apiVersion"] == "http.keda.sh/v1beta1"
    assert route["spec"]["target"] == {"service": "demo", "port": 8000}
    assert "demo-wake.ml.svc.cluster.local" in route["spec"]["rules"][0]["hosts"]
    assert "demo-wake.ml.svc.cluster.local:8080" in route["spec"]["rules"][0]["hosts"]
    assert route["spec"]["scalingMetric"] == {"concurrency": {"targetValue": 100}}
    # The default timeouts cover a cold start: the startup budget (1800 s) plus a margin.
    t = route["spec"]["timeouts"]
    assert wake.seconds(t["readiness"]) >= 1800 and wake.seconds(t["request"]) > wake.seconds(t["readiness"])
    assert t["responseHeader"] == "300s"
    svc = kids["Service", "demo-wake"]["spec"]
    assert svc == {"type": "ExternalName", "externalName": "keda-add-ons-http-interceptor-proxy.keda.svc.cluster.local",
                   "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}
    so = kids["ScaledObject", "demo"]["spec"]
    assert so["idleReplicaCount"] == 0 and so["minReplicaCount"] == 1
    assert so["triggers"][1] == {"type": "external-push", "metadata": {
        "scalerAddress": "keda-add-ons-http-external-scaler.keda:9090", "interceptorRoute": "demo"}}
    assert so["triggers"][0]["type"] == "prometheus"  # the engine metrics still scale 1..max
    assert wake.url(spec.parse(make_body(**SFZ))) == "http://demo-wake.ml.svc.cluster.local:8080/v1"


def test_scale_from_zero_spec_fields(make_body, validate_manifest):
    body = make_body(autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleFromZero": {
        "interceptorNamespace": "keda-http", "scalerAddress": "scaler.keda-http:9090", "targetConcurrency": 8,
        "timeouts": {"readiness": "45m", "request": "1h", "responseHeader": "10m"}}})
    kids = _kids(body)
    route = kids["InterceptorRoute", "demo"]
    validate_manifest(route)
    assert route["spec"]["timeouts"] == {"readiness": "45m", "request": "1h", "responseHeader": "10m"}
    assert route["spec"]["scalingMetric"]["concurrency"]["targetValue"] == 8
    assert kids["Service", "demo-wake"]["spec"]["externalName"].startswith("keda-add-ons-http-interceptor-proxy.keda-http.")
    assert kids["ScaledObject", "demo"]["spec"]["triggers"][1]["metadata"]["scalerAddress"] == "scaler.keda-http:9090"
    assert wake.seconds("1h30m") == 5400 and wake.seconds("500ms") == 0.5


def test_without_the_add_on_a_scale_to_zero_service_does_not_idle(make_body):
    kids = _kids(make_body(**SFZ), wake_available=False)
    assert ("InterceptorRoute", "demo") not in kids and ("Service", "demo-wake") not in kids
    so = kids["ScaledObject", "demo"]["spec"]
    assert "idleReplicaCount" not in so and [t["type"] for t in so["triggers"]] == ["prometheus"]


def test_scale_from_zero_off_or_not_at_zero(make_body):
    off = make_body(autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleFromZero": {"enabled": False}})
    kids = _kids(off)
    assert ("InterceptorRoute", "demo") not in kids  # idles with no wake-up path, as asked
    assert kids["ScaledObject", "demo"]["spec"]["idleReplicaCount"] == 0
    floor = _kids(make_body(autoscaling={"minReplicas": 1, "maxReplicas": 2}))
    assert ("InterceptorRoute", "demo") not in floor
    with pytest.raises(ValueError):
        wake.interceptor_route(spec.parse(make_body(replicas=1)))


@pytest.mark.parametrize("bad", [{"timeouts": {"readiness": "soon"}}, {"targetConcurrency": 0}])
def test_scale_from_zero_rejects_bad_values(make_body, our_validator, bad):
    body = make_body(autoscaling={"minReplicas": 0, "maxReplicas": 2, "scaleFromZero": bad})
    with pytest.raises(spec.InvalidSpec):
        spec.parse(body)
    assert list(our_validator.iter_errors(body))


def test_routing_renders_pool_picker_and_route(make_body, validate_manifest):
    kids = _kids(make_body(engine={"maxLoras": 2}, **ROUTED))
    for obj in kids.values():
        validate_manifest(obj)
    pool = kids["InferencePool", "demo"]
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"]["matchLabels"] == common.selector_labels(spec.parse(make_body()))
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"] == {"name": "demo-epp", "port": {"number": 9002}, "failureMode": "FailClose"}
    route = kids["HTTPRoute", "demo"]["spec"]
    assert route["parentRefs"] == [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "inference-gw",
                                    "namespace": "ml"}]
    assert route["rules"][0]["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                                 "name": "demo"}]
    dep = kids["Deployment", "demo-epp"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"].startswith("registry.k8s.io/gateway-api-inference-extension/epp:v")
    assert c["args"][:4] == ["--pool-name", "demo", "--pool-namespace", "ml"]
    assert "vllm:kv_cache_usage_perc" in c["args"] and "vllm:num_requests_waiting" in c["args"]
    assert pod["serviceAccountName"] == "demo-epp" and pod["volumes"][0]["configMap"]["name"] == "demo-epp"
    # The pool selects the engine pods only, never the picker's.
    selector = pool["spec"]["selector"]["matchLabels"]
    assert not all(dep["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert kids["Service", "demo-epp"]["spec"]["ports"][0]["port"] == 9002
    config = yaml.safe_load(kids["ConfigMap", "demo-epp"]["data"][routing.EPP_CONFIG_FILE])
    assert config["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in config["plugins"]}
    assert {"prefix-cache-scorer", "queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer",
            "max-score-picker", "single-profile-handler"} <= types
    refs = {p["pluginRef"] for p in config["schedulingProfiles"][0]["plugins"]}
    assert refs <= types and "lora-affinity-scorer" in refs
    role = kids["Role", "demo-epp"]
    assert role["rules"] == rbac.EPP_RULES
    binding = kids["RoleBinding", "demo-epp"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "demo-epp", "namespace": "ml"}]
    assert binding["roleRef"]["name"] == "demo-epp"


def test_routing_options(make_body):
    body = make_body(routing={"inferencePool": {"enabled": True, "failureMode": "FailOpen", "eppReplicas": 2,
                                                "eppImage": "reg/epp:x",
                                                "gateway": {"name": "gw", "namespace": "infra", "sectionName": "https"}}})
    kids = _kids(body)
    assert kids["HTTPRoute", "demo"]["spec"]["parentRefs"][0] | {} == {
        "group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "gw", "namespace": "infra", "sectionName": "https"}
    assert kids["InferencePool", "demo"]["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
    assert kids["Deployment", "demo-epp"]["spec"]["replicas"] == 2
    config = yaml.safe_load(kids["ConfigMap", "demo-epp"]["data"][routing.EPP_CONFIG_FILE])
    assert "lora-affinity-scorer" not in {p["type"] for p in config["plugins"]}  # no LoRA: no LoRA scorer
    assert not _kids(make_body(routing={"inferencePool": {"enabled": False}})).keys() & {("InferencePool", "demo")}
    with pytest.raises(spec.InvalidSpec, match="gateway"):
        spec.parse(make_body(routing={"inferencePool": {"enabled": True}}))


def test_epp_rules_are_read_only_and_namespaced():
    for rule in rbac.EPP_RULES:
        assert set(rule["verbs"]) <= {"get", "list", "watch"}
    # The operator may grant only what it holds itself.
    held = {(g, r, v) for rule in rbac.RULES for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}
    assert {(g, r, v) for rule in rbac.EPP_RULES for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]} <= held


def test_scaled_object_trigger_order_is_stable(make_body):
    s = spec.parse(make_body(**SFZ))
    assert autoscale.scaled_object(s)["spec"]["triggers"][1]["type"] == "external-push"
