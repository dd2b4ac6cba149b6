"""The pure builders: one test per spec feature; every object passes its schema."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from pageant.operator import render, spec
from pageant.operator.builders import autoscale, common, workload


def _children(body) -> dict[str, dict]:
    """kind -> manifest; the first of each kind (the engine's Deployment and Service come first)."""
    return {c.kind: c.manifest for c in reversed(render.children(spec.parse(body)))}


def _container(children) -> dict:
    return children["Deployment"]["spec"]["template"]["spec"]["containers"][0]


def _flag(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


FEATURES = {
    "hub": {"model": {"name": "m", "hub": {"repo": "org/m", "revision": "v2", "tokenSecretRef": {"name": "hf"}}}},
    "pvc": {"model": {"name": "m", "pvc": {"claimName": "weights", "path": "llama"}}},
    "cache": {"model": {"name": "m", "cache": {"repo": "org/m", "size": "40Gi", "storageClassName": "fast"}}},
    "demo": {"model": {"name": "pageant-demo", "demo": {}}, "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"}},
    "knobs": {"engine": {"image": "reg/engine:1", "maxModelLen": 4096, "maxNumSeqs": 64, "maxNumBatchedTokens": 2048,
                         "gpuMemoryUtilization": 0.85, "dtype": "bfloat16", "enablePrefixCaching": True,
                         "tensorParallelSize": 2, "maxLoras": 2, "maxLoraRank": 32, "maxCpuLoras": 4,
                         "maxQueuedRequests": 100, "shutdownTimeoutSeconds": 45, "extraArgs": ["--foo", "1"],
                         "env": [{"name": "X", "value": "1"}], "apiKeySecretRef": {"name": "key"}},
              "resources": {"gpus": 2, "gpuResourceName": "amd.com/gpu", "cpu": "4", "memory": "32Gi", "shmSize": "2Gi"}},
    "scheduling": {"scheduling": {"nodeSelector": {"gpu": "h100"}, "priorityClassName": "high",
                                  "runtimeClassName": "nvidia",
                                  "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                                  "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                                      "nodeSelectorTerms": [{"matchExpressions": [
                                          {"key": "zone", "operator": "In", "values": ["a"]}]}]}}}}},
    "keda": {"autoscaling": {"minReplicas": 0, "maxReplicas": 4}},
    "keda-kv": {"autoscaling": {"minReplicas": 2, "maxReplicas": 4, "metric": "KVCacheUsage"}},
    "keda-custom": {"autoscaling": {"maxReplicas": 3, "metric": "Custom", "query": "sum(up)", "target": 10}},
    "hpa": {"autoscaling": {"provider": "hpa", "minReplicas": 1, "maxReplicas": 3, "metric": "RunningRequests"}},
    "adapters": {"adapters": [{"name": "a1", "pvc": {"claimName": "loras", "path": "a1"}},
                              {"name": "a2", "hub": {"repo": "org/a2", "revision": "r"}}]},
    "servicemonitor": {"monitoring": {"labels": {"release": "prom"}}},
    "podmonitor": {"monitoring": {"kind": "PodMonitor", "interval": "30s"}},
    "replicas": {"replicas": 3},
    "no-netpol": {"networkPolicy": {"enabled": False}, "serviceAccountName": "engine"},
    "scale-from-zero-tuned": {"autoscaling": {"minReplicas": 0, "maxReplicas": 2, "scaleFromZero": {
        "interceptorNamespace": "keda-http", "targetConcurrency": 8,
        "timeouts": {"readiness": "45m", "request": "1h", "responseHeader": "10m"}}}},
    "pipeline": {"engine": {"tensorParallelSize": 2, "pipelineParallelSize": 2}, "resources": {"memory": "64Gi"}},
    "multinode": {"engine": {"tensorParallelSize": 4, "pipelineParallelSize": 2, "nodes": 2, "maxLoras": 2},
                  "replicas": 2, "monitoring": {"kind": "PodMonitor"}, "model": {"name": "m", "cache": {
                      "repo": "org/m", "size": "40Gi"}}, "autoscaling": {"minReplicas": 1, "maxReplicas": 3}},
    "routing": {"routing": {"inferencePool": {"enabled": True, "gateway": {"name": "inference-gw",
                                                                          "namespace": "gateways",
                                                                          "sectionName": "http"}}},
                "engine": {"maxLoras": 2}},
}


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_every_rendered_object_passes_its_schema(make_body, validate_manifest, feature):
    for child in render.children(spec.parse(make_body(**FEATURES[feature]))):
        validate_manifest(child.manifest)
        refs = child.manifest["metadata"]["ownerReferences"]
        assert refs == [{"apiVersion": "pageant.dev/v1alpha1", "kind": "InferenceService", "name": "demo",
                         "uid": "0b7c3f0e-1111-4222-8333-444455556666", "controller": True,
                         "blockOwnerDeletion": True}]
        labels = child.manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "pageant-operator"
        assert labels["pageant.dev/inferenceservice"] == "demo"


def test_validators_are_not_vacuous(make_body, validate_manifest):
    kids = _children(make_body(**FEATURES["keda"], **FEATURES["servicemonitor"]))
    dep = kids["Deployment"]
    dep["spec"]["template"]["spec"]["containers"][0]["bogus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(dep)
    so = kids["ScaledObject"]
    so["spec"]["triggers"][0].pop("type")
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(so)


def test_hub_model(make_body):
    kids = _children(make_body(**FEATURES["hub"]))
    c = _container(kids)
    assert c["command"] == ["pageant", "serve"]
    assert _flag(c["args"], "--model") == "org/m" and _flag(c["args"], "--revision") == "v2"
    assert _flag(c["args"], "--served-model-name") == "m" and _flag(c["args"], "--port") == "8000"
    assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in c["env"]
    assert {"name": "HF_HOME", "value": "/cache/huggingface"} in c["env"]


def test_pvc_model_is_mounted_read_only(make_body):
    kids = _children(make_body(**FEATURES["pvc"]))
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models", "readOnly": True} in _container(kids)["volumeMounts"]
    assert _flag(_container(kids)["args"], "--model") == "/models/llama"
    assert "PersistentVolumeClaim" not in kids and "Job" not in kids


def test_model_cache_pvc_job_and_wait(make_body):
    body = make_body(**FEATURES["cache"])
    kids = {c.kind: c for c in render.children(spec.parse(body))}
    assert kids["PersistentVolumeClaim"].create_only and kids["Job"].create_only
    pvc = kids["PersistentVolumeClaim"].manifest
    assert pvc["metadata"]["name"] == "demo-model-cache"
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "40Gi"}},
                           "storageClassName": "fast"}
    job = kids["Job"].manifest["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in job["containers"][0]["env"]}
    assert env["MODEL_REPO"] == "org/m" and env["MODEL_DIR"] == "/models/org--m/main"
    pod = kids["Deployment"].manifest["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "demo-model-cache", "readOnly": True}} in pod["volumes"]
    assert "/models/org--m/main/.pageant-download-complete" in pod["initContainers"][0]["command"][-1]
    assert _flag(pod["containers"][0]["args"], "--model") == "/models/org--m/main"


def test_engine_knobs_become_flags(make_body):
    kids = _children(make_body(**FEATURES["knobs"]))
    c = _container(kids)
    a = c["args"]
    expected = {"--max-model-len": "4096", "--max-num-seqs": "64", "--max-num-batched-tokens": "2048",
                "--gpu-memory-utilization": "0.85", "--dtype": "bfloat16", "--tensor-parallel-size": "2",
                "--max-loras": "2", "--max-lora-rank": "32", "--max-cpu-loras": "4", "--max-queued-requests": "100",
                "--shutdown-timeout": "45", "--device": "cuda", "--api-key": "$(PAGEANT_API_KEY)"}
    assert {f: _flag(a, f) for f in expected} == expected
    assert "--enable-prefix-caching" in a and "--enable-lora" in a and a[-2:] == ["--foo", "1"]
    assert c["image"] == "reg/engine:1"
    assert c["resources"] == {"requests": {"cpu": "4", "memory": "32Gi"},
                              "limits": {"memory": "32Gi", "amd.com/gpu": "2"}}
    assert {"name": "X", "value": "1"} in c["env"]
    pod = kids["Deployment"]["spec"]["template"]["spec"]
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}} in pod["volumes"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_cpu_only_replicas_get_no_gpu(make_body):
    c = _container(_children(make_body(resources={"gpus": 0})))
    assert "--device" not in c["args"] and "limits" not in c["resources"]


def test_probes_drain_security_and_rollout(make_body):
    dep = _children(make_body(engine={"shutdownTimeoutSeconds": 60, "startupTimeoutSeconds": 1200}))["Deployment"]
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 1200
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health"
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + 60
    assert dep["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    # Restricted Pod Security Standard, as the images' user (tests/chart/test_images.py checks the Dockerfiles).
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == common.RUN_AS_USER
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for ctr in pod["containers"] + pod.get("initContainers", []):
        sc = ctr["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["runAsNonRoot"] is True
    assert not any("hostPath" in v for v in pod["volumes"])
    assert pod["automountServiceAccountToken"] is False


def test_scheduling(make_body):
    pod = _children(make_body(**FEATURES["scheduling"]))["Deployment"]["spec"]["template"]["spec"]
    s = FEATURES["scheduling"]["scheduling"]
    assert pod["nodeSelector"] == s["nodeSelector"] and pod["tolerations"] == s["tolerations"]
    assert pod["affinity"] == s["affinity"]
    assert pod["priorityClassName"] == "high" and pod["runtimeClassName"] == "nvidia"


def test_config_hash_rolls_on_serving_changes_only(make_body):
    def hash_of(**spec_kw):
        return workload.template_hash(_children(make_body(**spec_kw))["Deployment"])

    base = hash_of(engine={"maxLoras": 2})
    assert base == hash_of(engine={"maxLoras": 2})
    # Serving configuration changes roll the pods...
    assert hash_of(engine={"maxLoras": 2, "maxModelLen": 1024}) != base
    assert hash_of(engine={"maxLoras": 2, "image": "other:2"}) != base
    # ...replica counts, autoscaling, monitoring and the adapter list (on an already-enabled LoRA
    # engine, Hub adapters or adapters on an already-mounted claim) do not.
    assert hash_of(engine={"maxLoras": 2}, replicas=4) == base
    assert hash_of(engine={"maxLoras": 2}, autoscaling={"maxReplicas": 9}, monitoring={}) == base
    assert hash_of(engine={"maxLoras": 2}, adapters=[{"name": "x", "hub": {"repo": "o/x"}}]) == base
    one = hash_of(engine={"maxLoras": 2}, adapters=[{"name": "x", "pvc": {"claimName": "l", "path": "x"}}])
    two = hash_of(engine={"maxLoras": 2}, adapters=[{"name": "x", "pvc": {"claimName": "l", "path": "x"}},
                                                    {"name": "y", "pvc": {"claimName": "l", "path": "y"}}])
    assert one == two


def test_adapters_configmap_and_volumes(make_body):
    kids = _children(make_body(**FEATURES["adapters"]))
    doc = json.loads(kids["ConfigMap"]["data"]["adapters.json"])
    assert doc == {"adapters": [{"name": "a1", "path": "/adapters/loras/a1"},
                                {"name": "a2", "path": "org/a2", "revision": "r"}]}
    c = _container(kids)
    assert _flag(c["args"], "--lora-modules-file") == "/etc/pageant/adapters/adapters.json"
    assert {"name": "adapters-0", "mountPath": "/adapters/loras", "readOnly": True} in c["volumeMounts"]
    assert "--allowed-lora-root" not in c["args"]  # a Hub adapter is listed: the engine must download it
    pvc_only = _container(_children(make_body(adapters=[FEATURES["adapters"]["adapters"][0]])))
    assert _flag(pvc_only["args"], "--allowed-lora-root") == "/adapters"
    # Mounted as a directory (a subPath mount would never see updates).
    mount = next(m for m in c["volumeMounts"] if m["name"] == "adapters-config")
    assert "subPath" not in mount


def test_service_networkpolicy_pdb(make_body):
    kids = _children(make_body())
    svc = kids["Service"]["spec"]
    assert svc["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    assert svc["selector"] == kids["Deployment"]["spec"]["selector"]["matchLabels"]
    np = kids["NetworkPolicy"]["spec"]
    assert np["policyTypes"] == ["Ingress"] and np["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]
    assert "PodDisruptionBudget" not in kids  # one replica
    assert _children(make_body(replicas=2))["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert "PodDisruptionBudget" in _children(make_body(autoscaling={"minReplicas": 2, "maxReplicas": 3}))
    assert "NetworkPolicy" not in _children(make_body(**FEATURES["no-netpol"]))


def test_keda_scale_to_zero(make_body):
    kids = _children(make_body(**FEATURES["keda"]))
    so = kids["ScaledObject"]["spec"]
    assert so["scaleTargetRef"] == {"apiVersion": "pageant.dev/v1alpha1", "kind": "InferenceService", "name": "demo"}
    assert so["idleReplicaCount"] == 0 and so["minReplicaCount"] == 1 and so["maxReplicaCount"] == 4
    assert so["initialCooldownPeriod"] >= 600
    trigger, wake = so["triggers"]  # the engine signal, and the HTTP add-on's pending requests
    assert wake["type"] == "external-push" and wake["metadata"]["interceptorRoute"] == "demo"
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"]["query"] == 'sum(vllm:num_requests_waiting{namespace="ml",model_name="tiny"})'
    assert trigger["metadata"]["threshold"] == "4"
    assert kids["Deployment"]["spec"]["replicas"] == 1  # starts loaded; KEDA idles it after the cooldowns
    assert "HorizontalPodAutoscaler" not in kids


def test_keda_signals(make_body):
    so = _children(make_body(**FEATURES["keda-kv"]))["ScaledObject"]["spec"]
    assert "vllm:kv_cache_usage_perc" in so["triggers"][0]["metadata"]["query"]
    assert so["triggers"][0]["metadata"]["threshold"] == "0.8" and "idleReplicaCount" not in so
    so = _children(make_body(**FEATURES["keda-custom"]))["ScaledObject"]["spec"]
    assert so["triggers"][0]["metadata"] == {**so["triggers"][0]["metadata"], "query": "sum(up)", "threshold": "10"}


def test_hpa(make_body):
    kids = _children(make_body(**FEATURES["hpa"]))
    hpa = kids["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["kind"] == "InferenceService"
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 3)
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == autoscale.HPA_METRIC_NAMES["RunningRequests"]
    assert hpa["metrics"][0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "16"}
    assert "ScaledObject" not in kids


def test_monitors(make_body):
    sm = _children(make_body(**FEATURES["servicemonitor"]))["ServiceMonitor"]
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    pm = _children(make_body(**FEATURES["podmonitor"]))["PodMonitor"]
    assert pm["spec"]["podMetricsEndpoints"][0]["interval"] == "30s"
    assert "ServiceMonitor" not in _children(make_body())


def test_render_without_uid_has_no_owner_reference(make_body):
    body = make_body()
    del body["metadata"]["uid"]
    assert all("ownerReferences" not in c.manifest["metadata"] for c in render.children(spec.parse(body)))


def test_render_cli_examples_and_no_torch(validate_manifest):
    """`pageant crd` and `pageant operator render` work and never import torch or the engine."""
    code = (
        "import sys, io, json, contextlib\n"
        "from pageant.cli import main\n"
        "outs = []\n"
        "for argv in [['crd']] + [['operator', 'render', '-f', f] for f in sys.argv[1:]]:\n"
        "    buf = io.StringIO()\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        assert main(argv) == 0, argv\n"
        "    outs.append(buf.getvalue())\n"
        "import pageant.operator.main, pageant.operator.handlers\n"
        "bad = [m for m in ('torch', 'pageant.engine') if m in sys.modules]\n"
        "assert not bad, f'operator imported {bad}'\n"
        "print(json.dumps(outs))\n")
    files = [str(p) for p in sorted((pathlib.Path(__file__).parents[2] / "examples").glob("*.yaml"))]
    out = subprocess.run([sys.executable, "-c", code, *files], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    crd_text, *renders = json.loads(out.stdout)
    assert yaml.safe_load(crd_text)["kind"] == "CustomResourceDefinition"
    docs = [d for text in renders for d in yaml.safe_load_all(text) if d]
    assert {"Deployment", "Service", "ConfigMap", "ScaledObject", "PodMonitor", "ServiceMonitor", "Job"} <= {
        d["kind"] for d in docs}
    for d in docs:
        validate_manifest(d)


def test_render_cli_reports_invalid_spec(tmp_path, make_body):
    body = make_body(autoscaling={"minReplicas": 3, "maxReplicas": 1})
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(body))
    out = subprocess.run([sys.executable, "-m", "pageant.cli", "operator", "render", "-f", str(f)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "minReplicas must be <= maxReplicas" in out.stderr and not out.stdout


def test_render_reads_stdin_and_skips_other_kinds(make_body):
    docs = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ml"}}, make_body()]
    out = subprocess.run([sys.executable, "-m", "pageant.cli", "operator", "render", "-f", "-"],
                         input=yaml.safe_dump_all(docs), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(out.stdout)]
    assert kinds == ["Deployment", "Service", "NetworkPolicy"]
    missing = subprocess.run([sys.executable, "-m", "pageant.cli", "operator", "render", "-f", "/nonexistent.yaml"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "cannot read" in missing.stderr


@pytest.mark.parametrize("feature", ["hub", "pvc", "cache", "demo", "knobs", "adapters", "pipeline"])
def test_engine_accepts_the_rendered_args(make_body, feature):
    """Contract with the engine: its own argument parser takes what the operator renders."""
    from pageant.engine.server.cli import build_parser  # test-only: the operator never imports the engine

    body = make_body(**FEATURES[feature])
    c = _container(_children(body))
    assert c["command"] == ["pageant", "serve"]
    args = c["args"][:-2] if feature == "knobs" else c["args"]  # drop the user's own extraArgs
    parsed = build_parser().parse_args(args)
    assert parsed.port == 8000 and parsed.host == "0.0.0.0"
    assert parsed.served_model_name == [body["spec"]["model"]["name"]]
    assert (parsed.model is None) is (feature == "demo")  # no --model: `pageant serve` serves the demo


def test_demo_model_on_cpu(make_body):
    """The bundled demo model: no --model, no weights volume, no GPU, nothing downloaded."""
    kids = _children(make_body(**FEATURES["demo"]))
    assert set(kids) == {"Deployment", "Service", "NetworkPolicy"}
    c = _container(kids)
    assert "--model" not in c["args"] and "--device" not in c["args"]
    assert _flag(c["args"], "--served-model-name") == "pageant-demo"
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"}, "limits": {"memory": "2Gi"}}
    volumes = kids["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert not [v for v in volumes if "persistentVolumeClaim" in v]
    assert "HF_TOKEN" not in {e["name"] for e in c["env"]}


def test_download_job_script(tmp_path, make_body):
    """The Job's script, run for real against a stand-in huggingface_hub: it downloads once, marks
    the cache complete, and a later run (Job retry or re-creation) does nothing."""
    job = _children(make_body(**FEATURES["cache"]))["Job"]["spec"]["template"]["spec"]["containers"][0]
    script = job["command"][-1]
    fake = tmp_path / "site"
    (fake / "huggingface_hub").mkdir(parents=True)
    (fake / "huggingface_hub" / "__init__.py").write_text(
        "import pathlib, os\n"
        "def snapshot_download(repo_id, revision, local_dir):\n"
        "    p = pathlib.Path(local_dir); p.mkdir(parents=True, exist_ok=True)\n"
        "    (p / 'config.json').write_text(repo_id + '@' + revision)\n"
        "    with open(os.environ['CALLS'], 'a') as f: f.write('x')\n")
    env = {e["name"]: e["value"] for e in job["env"] if "value" in e}
    env.update(MODEL_DIR=str(tmp_path / "models" / "org--m" / "main"), PYTHONPATH=str(fake),
               CALLS=str(tmp_path / "calls"), PATH="/usr/bin:/bin")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    model_dir = tmp_path / "models" / "org--m" / "main"
    assert (model_dir / "config.json").read_text() == "org/m@main"
    assert (model_dir / ".pageant-download-complete").exists()
    assert (tmp_path / "calls").read_text() == "x"  # downloaded once
