"""`helm lint` and `helm template` with the default values and every ci/*-values.yaml; every object
passes strict validation; naming, labels and the restricted Pod Security profile."""

from __future__ import annotations

import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "pageant"
CI_FILES = sorted((CHART / "ci").glob("*-values.yaml"))
CASES = [None, *CI_FILES]
IDS = ["default", *(p.name for p in CI_FILES)]


def test_ci_values_files_exist():
    assert {p.name for p in CI_FILES} >= {"namespaced-values.yaml", "monitoring-values.yaml", "minimal-values.yaml"}


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_helm_lint(helm, values):
    args = ["lint", str(CHART), "--strict"] + (["-f", str(values)] if values else [])
    out = helm(*args)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_every_object_validates(render, validate_object, values):
    objs = render(*([values] if values else []))
    assert objs
    for obj in objs:
        validate_object(obj)


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_template_files_are_named_component_kind(render, values):
    for obj in render(*([values] if values else [])):
        name = pathlib.PurePosixPath(obj["_source"]).name
        component, _, kind = name.removesuffix(".yaml").partition("-")
        assert component in {"crd", "operator", "engine", "dashboards", "alerts"}, name
        assert kind == obj["kind"].lower(), f"{name} renders a {obj['kind']}"


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_common_labels(render, values):
    for obj in render(*([values] if values else [])):
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == "pt"
        assert labels["app.kubernetes.io/part-of"] == "pageant"


def _by_kind(objs, kind):
    return [o for o in objs if o["kind"] == kind]


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_operator_pod_is_restricted(render, values):
    (dep,) = _by_kind(render(*([values] if values else [])), "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC")
    (container,) = spec["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc.get("privileged") is not True
    assert sc["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    args = container["args"]
    assert args[:2] == ["operator", "run"]
    assert args[args.index("--metrics-port") + 1] == "8080" and args[args.index("--health-port") + 1] == "8081"
    for volume in spec.get("volumes", []):
        assert set(volume) <= {"name", "emptyDir", "configMap", "projected", "secret", "persistentVolumeClaim",
                               "downwardAPI", "ephemeral", "csi"}, volume


def test_operator_image_tag_and_digest(render):
    (dep,) = _by_kind(render(), "Deployment")
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "ghcr.io/pageant-project/pageant-operator:0.1.0"
    (dep,) = _by_kind(render(CHART / "ci" / "minimal-values.yaml"), "Deployment")
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    assert image.startswith("registry.example.com/pageant/operator@sha256:")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "pageant-operator"


def test_namespaced_mode_passes_namespaces(render):
    (dep,) = _by_kind(render(CHART / "ci" / "namespaced-values.yaml"), "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert [args[i + 1] for i, a in enumerate(args) if a == "--namespace"] == ["team-a", "team-b"]


def test_operator_metrics_service_and_servicemonitor(render):
    objs = render(CHART / "ci" / "monitoring-values.yaml")
    (svc,) = _by_kind(objs, "Service")
    (dep,) = _by_kind(objs, "Deployment")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    (sm,) = _by_kind(objs, "ServiceMonitor")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (pm,) = _by_kind(objs, "PodMonitor")
    assert pm["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "pageant-engine"}
    assert pm["spec"]["podTargetLabels"] == ["pageant.dev/inferenceservice"]
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert pm["spec"]["namespaceSelector"] == {"any": True}
    assert _by_kind(objs, "PrometheusRule")


def test_optional_monitoring_objects_are_off_by_default(render):
    kinds = {o["kind"] for o in render()}
    assert not kinds & {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert {"CustomResourceDefinition", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "Service", "ConfigMap"} <= kinds


def test_dashboards_configmaps_for_the_grafana_sidecar(render):
    maps = _by_kind(render(), "ConfigMap")
    assert {m["metadata"]["name"] for m in maps} == {"pt-pageant-dashboard-engine", "pt-pageant-dashboard-operator"}
    for m in maps:
        assert m["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert m["metadata"]["annotations"]["grafana_folder"] == "Pageant"
        (key,) = m["data"]
        assert key.endswith(".json")
    maps = _by_kind(render(CHART / "ci" / "namespaced-values.yaml"), "ConfigMap")
    assert {m["metadata"]["namespace"] for m in maps} == {"monitoring"}
    assert not _by_kind(render(CHART / "ci" / "minimal-values.yaml"), "ConfigMap")


def test_notes_explain_a_first_inferenceservice(helm):
    out = helm("install", "pt", str(CHART), "--dry-run=client", "--namespace", "pageant-system")
    assert out.returncode == 0, out.stderr
    notes = out.stdout.split("NOTES:", 1)[1]
    assert "kind: InferenceService" in notes and "get infsvc -w" in notes
    assert ".svc.cluster.local:8000/v1" in notes


def test_validation_rejects_unknown_fields(render, validate_object):
    """The checks above can fail: a misspelt field in a built-in kind and in a monitoring kind."""
    objs = render(CHART / "ci" / "monitoring-values.yaml")
    (dep,) = _by_kind(objs, "Deployment")
    dep["spec"]["replica"] = 2
    with pytest.raises(AssertionError, match="replica"):
        validate_object(dep)
    (sm,) = _by_kind(objs, "ServiceMonitor")
    sm["spec"]["endpoints"][0]["intervall"] = "5s"
    with pytest.raises(AssertionError):
        validate_object(sm)
    (rule,) = _by_kind(objs, "PrometheusRule")
    rule["spec"]["groups"][0]["rules"][0]["for"] = 5
    with pytest.raises(AssertionError):
        validate_object(rule)


@pytest.mark.parametrize("values", CASES, ids=IDS)
def test_operator_cli_accepts_the_chart_args(render, values):
    """The Deployment's args parse with the operator's real argument parser."""
    from pageant.operator import cli

    (dep,) = _by_kind(render(*([values] if values else [])), "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "operator"
    parsed = cli._parser().parse_args(args[1:])
    assert parsed.command == "run" and parsed.metrics_port == 8080 and parsed.health_port == 8081
    assert parsed.engine_image.startswith("ghcr.io/pageant-project/pageant-engine:")


def test_operator_flags_from_values(render):
    (dep,) = _by_kind(render(set_=("operator.verbose=true", "operator.resyncSeconds=30",
                                   "engine.image.tag=v9")), "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--verbose" in args and args[args.index("--resync-seconds") + 1] == "30"
    assert args[args.index("--engine-image") + 1] == "ghcr.io/pageant-project/pageant-engine:v9"


def test_helm_package_ships_what_it_needs(helm, render, tmp_path):
    """The packaged chart (what users install from a repository) renders the same objects and
    leaves out the development tools and PNGs."""
    import tarfile

    out = helm("package", str(CHART), "--destination", str(tmp_path))
    assert out.returncode == 0, out.stderr
    (tgz,) = tmp_path.glob("pageant-*.tgz")
    with tarfile.open(tgz) as tar:
        names = set(tar.getnames())
    for needed in ("values.schema.json", "files/crds/pageant.dev_inferenceservices.yaml", "files/rbac/operator-rules.yaml",
                   "files/dashboards/engine.json", "files/dashboards/operator.json", "templates/NOTES.txt", "README.md"):
        assert f"pageant/{needed}" in names, needed
    assert not [n for n in names if "/tools/" in n or n.endswith(".png") or "__pycache__" in n]
    packaged = helm("template", "pt", str(tgz), "--namespace", "pageant-system")
    assert packaged.returncode == 0, packaged.stderr
    assert packaged.stdout == render(raw=True)
