"""The Grafana dashboards: generated from tools/dashboards.py, complete, and valid PromQL."""

from __future__ import annotations

import subprocess

import yaml

ENGINE_TOPICS = {  # what the issue asks the engine dashboard to show -> a metric that shows it
    "replicas": "count by (namespace, model_name) (vllm:num_requests_running",
    "running": "vllm:num_requests_running",
    "waiting": "vllm:num_requests_waiting",
    "kv cache": "vllm:kv_cache_usage_perc",
    "ttft": "vllm:time_to_first_token_seconds_bucket",
    "itl": "vllm:inter_token_latency_seconds_bucket",
    "e2e": "vllm:e2e_request_latency_seconds_bucket",
    "prompt tokens": "vllm:prompt_tokens_total",
    "generation tokens": "vllm:generation_tokens_total",
    "prefix cache hits": "vllm:prefix_cache_hits_total",
    "preemptions": "vllm:num_preemptions_total",
    "lora": "vllm:lora_requests_info",
    "errors by reason": "vllm:request_failure_total",
}
OPERATOR_METRICS = {"pageant_operator_reconciliations_total", "pageant_operator_reconcile_errors_total",
                    "pageant_operator_reconcile_duration_seconds_bucket", "pageant_operator_managed_inferenceservices"}


def test_json_files_are_generated_from_the_module(obs):
    module = obs.dashboard_module()
    for name in module.DASHBOARDS:
        path = obs.CHART / "files" / "dashboards" / f"{name}.json"
        assert path.read_text() == module.render_json(name), "run `python charts/pageant/tools/dashboards.py`"
    assert set(obs.load_dashboards()) == set(module.DASHBOARDS)


def test_engine_dashboard_covers_the_issue(obs):
    exprs = " ".join(e for _, e in obs.dashboard_queries(obs.load_dashboards()["engine"]))
    for topic, needle in ENGINE_TOPICS.items():
        assert needle in exprs, topic
    for q in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({q}, sum by (namespace, model_name, le) (rate(vllm:time_to_first_token" in exprs


def test_operator_dashboard_covers_its_metrics(obs):
    exprs = " ".join(e for _, e in obs.dashboard_queries(obs.load_dashboards()["operator"]))
    for metric in OPERATOR_METRICS:
        assert metric in exprs


def test_dashboard_structure(obs):
    for name, dash in obs.load_dashboards().items():
        assert dash["uid"] == f"pageant-{name}" and dash["title"].startswith("Pageant / ")
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids))
        for panel in dash["panels"]:
            grid = panel["gridPos"]
            assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24
            if panel["type"] != "row":
                assert panel["targets"] and panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
                assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        names = [v["name"] for v in dash["templating"]["list"]]
        assert names[0] == "datasource"
        used = {w for _, e in obs.dashboard_queries(dash) for w in ("$namespace", "$model") if w in e}
        assert used <= {f"${n}" for n in names}


def test_every_query_is_valid_promql(obs, promtool, tmp_path):
    """promtool parses each query (Grafana variables substituted) as a recording rule."""
    rules = []
    for name, dash in obs.load_dashboards().items():
        for i, (title, expr) in enumerate(obs.dashboard_queries(dash) + obs.variable_queries(dash)):
            rules.append({"record": f"pageant:check:{name}_{i}", "expr": obs.substitute(expr),
                          "labels": {"panel": title}})
    path = tmp_path / "dashboards-as-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout
