"""The dashboards, alerts and autoscaling query against a real Prometheus scraping real engines.

One module-scoped stack (charts/pageant/tools/live_stack.py): two `pageant serve` processes on a
tiny checkpoint ("tiny-chat", and "tiny-spare" which is stopped to play a dead replica), the
operator's metrics endpoint (its real OperatorMetrics registry served as `pageant operator run`
serves it, fed with reconciliations the way pageant.operator.operations records them: no cluster
here, so no real kopf loop), and Debian's `prometheus` scraping them every second with the chart's rules loaded (thresholds lowered so that they fire under load). A
load generator (the real `openai` client, plus a few invalid requests) overloads tiny-chat. Then:
every dashboard query and every alert expression returns data with the labels its legend or
annotations use; Prometheus evaluates every rule without error; the query the operator renders for
KEDA reports the engine's waiting requests (> 0 under overload, 0 when idle); and
tools/render_dashboards.py draws every dashboard from that Prometheus.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import pathlib
import re
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.slow
NAMESPACE = "ml"

LOAD_SECONDS = 20


def _render_autoscaler(tmp: pathlib.Path, provider: str, metric: str, prometheus_url: str, namespace: str) -> dict:
    """`pageant operator render` of tiny-chat with autoscaling; returns the ScaledObject or HPA."""
    isvc = {"apiVersion": "pageant.dev/v1alpha1", "kind": "InferenceService",
            "metadata": {"name": "tiny-chat", "namespace": namespace},
            "spec": {"model": {"name": "tiny-chat", "pvc": {"claimName": "models", "path": "tiny"}},
                     "autoscaling": {"provider": provider, "minReplicas": 1, "maxReplicas": 3, "metric": metric,
                                     "target": 2, "prometheusAddress": prometheus_url}}}
    path = tmp / f"isvc-{provider}-{metric}.yaml"
    path.write_text(yaml.safe_dump(isvc))
    out = subprocess.run([sys.executable, "-m", "pageant.cli", "operator", "render", "-f", str(path)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    kind = "ScaledObject" if provider == "keda" else "HorizontalPodAutoscaler"
    (obj,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == kind]
    return obj


@pytest.fixture(scope="module")
def stack(obs):
    obs.require_prometheus()
    return obs.load_tool("live_stack")


@pytest.fixture(scope="module")
def live(tmp_path_factory, obs, stack):
    """Run the whole scenario once; tests assert on what it recorded."""
    from pageant.engine.testing import build_checkpoint

    tmp = tmp_path_factory.mktemp("live")
    ckpt = build_checkpoint(tmp / "ckpt")
    ports = {"tiny-chat": stack.free_port(), "tiny-spare": stack.free_port()}
    chat_port, op_port, prom_port = ports["tiny-chat"], stack.free_port(), stack.free_port()
    procs = [stack.start_engine(ckpt, name, port, tmp / f"{name}.log") for name, port in ports.items()]
    spare = procs[1]
    try:
        procs.append(stack.start_operator_metrics(op_port, tmp / "operator.log"))
        # The chart's rules with thresholds at zero and no `for`, so that they fire under this load.
        zero = {"for": "0s"}
        groups = obs.rule_groups(*(f"prometheusRule.alerts.{k}=" + json.dumps({"enabled": True, **v, **zero}) for k, v in {
            "kvCacheSaturated": {"threshold": 0, "severity": "warning"},
            "queueGrowing": {"threshold": 0, "window": "5m", "severity": "warning"},
            "ttftHigh": {"thresholdSeconds": 0, "window": "1m", "severity": "warning"},
            "noReadyReplicas": {"lookback": "1h", "severity": "critical"},
            "operatorReconcileErrors": {"threshold": 0, "window": "1m", "severity": "warning"},
        }.items()))
        procs.append(stack.start_prometheus(tmp, prom_port, ports, op_port, groups))
        prom = stack.Prom(f"http://127.0.0.1:{prom_port}")
        stack.wait_http(f"{prom.url}/-/ready", procs, 60, "prometheus")
        for name, port in ports.items():
            stack.wait_http(f"http://127.0.0.1:{port}/ready", procs, 180, f"pageant serve {name}")
        deadline = time.monotonic() + 30
        while prom.scalar("sum(up)") != 3 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert prom.scalar("sum(up)") == 3, "Prometheus does not scrape both engines and the operator"

        keda = {metric: _render_autoscaler(tmp, "keda", metric, prom.url, stack.NAMESPACE)
                ["spec"]["triggers"][0]["metadata"]["query"] for metric in ("WaitingRequests", "RunningRequests", "KVCacheUsage")}
        rec: dict = {"prom": prom, "tmp": tmp, "keda": keda}
        waiting = lambda: stack.engine_metric(chat_port, "vllm:num_requests_waiting", "tiny-chat")  # noqa: E731
        time.sleep(2)
        rec["idle_before"] = (prom.scalar(keda["WaitingRequests"]), waiting())

        stack.stop(spare)  # a replica that served and died: its target stays, with up == 0

        samples: list[tuple[float, float | None, float]] = []
        stop_at = time.monotonic() + LOAD_SECONDS
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            load = pool.submit(stack.run_load, f"http://127.0.0.1:{chat_port}", LOAD_SECONDS, "tiny-chat")
            while not load.done():
                samples.append((time.time(), prom.scalar(keda["WaitingRequests"]), waiting()))
                if time.monotonic() < stop_at - 3:
                    rec["overload_time"] = time.time()
                time.sleep(1)
            rec["counts"] = load.result()
        rec["samples"] = samples
        rec["load_end"] = time.time()
        rec["at"] = min(rec["overload_time"], rec["load_end"] - 3)  # a moment under full load

        time.sleep(4)  # scrapes of the idle engine
        rec["idle_after"] = (prom.scalar(keda["WaitingRequests"]), waiting())
        rec["keda_at_load"] = {m: prom.scalar(q, rec["at"]) for m, q in keda.items()}
        rec["rules"] = prom.api("rules")["groups"]
        rec["alerts_at_load"] = prom.query('ALERTS{alertstate="firing"}', rec["at"])
        rec["cache_config"] = prom.query('vllm:cache_config_info{model_name="tiny-chat"}')
        yield rec
    finally:
        for p in procs:
            stack.stop(p)


# Labels that are empty (so absent in Prometheus) when no adapter has requests.
MAY_BE_EMPTY = {"running_lora_adapters", "waiting_lora_adapters"}


def _legend_labels(fmt: str) -> set[str]:
    return set(re.findall(r"\{\{\s*(\w+)\s*\}\}", fmt)) - MAY_BE_EMPTY


def test_dashboard_queries_return_data(live, obs):
    prom, at = live["prom"], live["at"]
    prefix_caching = live["cache_config"][0]["metric"].get("enable_prefix_caching") == "True"
    empty, bad = [], []
    for name, dash in obs.load_dashboards().items():
        for panel in dash["panels"]:
            for target in panel.get("targets", []):
                expr = obs.substitute(target["expr"], "15s")
                result = prom.query(expr, at)
                if not result:
                    empty.append(f"{panel['title']}: {expr}")
                    continue
                for series in result:
                    missing = _legend_labels(target["legendFormat"]) - set(series["metric"])
                    if missing:
                        bad.append(f"{panel['title']}: no labels {missing} in {series['metric']}")
                    value = float(series["value"][1])
                    if not math.isfinite(value) and not (panel["title"] == "Prefix-cache hit rate" and not prefix_caching):
                        bad.append(f"{panel['title']}: {value} for {series['metric']}")
                if "model_name" in expr:
                    assert any(s["metric"].get("model_name") == "tiny-chat" for s in result), expr
    assert not empty, "queries without data:\n" + "\n".join(empty)
    assert not bad, "\n".join(bad)


def test_dashboard_variables_list_the_service(live, obs):
    for name, dash in obs.load_dashboards().items():
        for title, expr in obs.variable_queries(dash):
            result = live["prom"].query(obs.substitute(expr), live["at"])
            values = {next(iter(s["metric"].values()), None) for s in result}
            assert values & {NAMESPACE, "tiny-chat", "pageant-system"}, (name, title, values)


def test_load_really_overloaded_the_engine(live):
    assert live["counts"]["ok"] >= 12 and live["counts"]["rejected"] >= 1, live["counts"]
    prom, at = live["prom"], live["at"]
    failures = prom.query('sum by (reason) (vllm:request_failure_total{model_name="tiny-chat"})', at)
    assert failures and sum(float(s["value"][1]) for s in failures) >= 1


def test_keda_query_reports_the_engines_waiting_requests(live):
    """The operator's ScaledObject query: > 0 while overloaded, 0 when idle, as the engine says."""
    assert live["keda"]["WaitingRequests"].startswith("sum(vllm:num_requests_waiting{")
    assert live["idle_before"] == (0.0, 0.0)
    assert live["idle_after"] == (0.0, 0.0)
    under_load = [(p, e) for _, p, e in live["samples"] if p is not None]
    assert max(p for p, _ in under_load) > 0 and max(e for _, e in under_load) > 0, live["samples"]
    # What Prometheus answers is what the engine reported at its last scrape: its values are values
    # the engine's /metrics showed (integers within the engine's range), and they move together.
    assert all(float(p).is_integer() and 0 <= p <= 256 for p, _ in under_load)
    assert max(p for p, _ in under_load) <= max(e for _, e in under_load) + 12
    for metric, value in live["keda_at_load"].items():
        assert value is not None and value > 0, (metric, value, live["keda"][metric])


def test_keda_query_equals_the_engine_sample(live):
    """At a scrape's timestamp Prometheus returns exactly the engine's sample."""
    prom = live["prom"]
    raw = prom.api("query", query=f'vllm:num_requests_waiting{{model_name="tiny-chat"}}[{LOAD_SECONDS + 20}s]',
                   time=f"{live['load_end'] + 4:.3f}")["result"]
    (series,) = raw
    assert max(float(v) for _, v in series["values"]) > 0
    for ts, value in series["values"][-20:]:
        assert prom.scalar(live["keda"]["WaitingRequests"], float(ts)) == float(value)


def test_prometheus_adapter_rule_serves_the_hpa_metric(live, obs, stack):
    """The README's prometheus-adapter rule, evaluated the way the adapter does, gives the HPA the
    per-pod metric the operator names, with the engine's value."""
    readme = (obs.ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if "seriesQuery" in b]
    (rule,) = yaml.safe_load(block)["rules"]["custom"]
    prom, at = live["prom"], live["at"]
    series = prom.query(rule["seriesQuery"], at)
    names = {s["metric"]["__name__"] for s in series}
    assert {"vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc"} <= names
    for metric, engine_name in (("WaitingRequests", "vllm:num_requests_waiting"),
                                ("KVCacheUsage", "vllm:kv_cache_usage_perc")):
        hpa = _render_autoscaler(live["tmp"], "hpa", metric, prom.url, NAMESPACE)
        hpa_name = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
        as_ = rule["name"]["as"].replace("${1}", r"\1")
        assert re.sub(rule["name"]["matches"], as_, engine_name) == hpa_name
        pod = stack.pod_name("tiny-chat")
        query = (rule["metricsQuery"].replace("<<.GroupBy>>", "pod").replace("<<.Series>>", engine_name)
                 .replace("<<.LabelMatchers>>", f'namespace="{NAMESPACE}",pod=~"{pod}"'))
        (value,) = prom.query(query, at)
        assert value["metric"] == {"pod": pod} and float(value["value"][1]) > 0, (metric, value)


def test_every_alert_expression_returns_data_under_load(live, obs):
    prom, at = live["prom"], live["at"]
    expected = {"PageantKVCacheSaturated": "tiny-chat", "PageantQueueGrowing": "tiny-chat",
                "PageantTimeToFirstTokenHigh": "tiny-chat", "PageantNoReadyReplicas": "tiny-spare"}
    rules = {r["name"]: r for g in live["rules"] for r in g["rules"]}
    for alert, model in expected.items():
        result = prom.query(rules[alert]["query"], at)
        assert result, f"{alert}: no data for {rules[alert]['query']}"
        assert {(s["metric"].get("namespace"), s["metric"].get("model_name")) for s in result} == {(NAMESPACE, model)}
    firing = {(a["metric"]["alertname"], a["metric"].get("model_name")) for a in live["alerts_at_load"]}
    assert {(a, m) for a, m in expected.items()} <= firing, firing
    errors = prom.query(rules["PageantOperatorReconcileErrors"]["query"], at)
    assert {(s["metric"]["namespace"], s["metric"]["handler"], s["metric"]["reason"]) for s in errors} == \
        {("pageant-system", "resync", "api_error")}
    # The operator is scraped and up: "down" stays quiet (promtool tests cover it firing).
    assert not prom.query(rules["PageantOperatorDown"]["query"], at)
    assert ("PageantOperatorReconcileErrors", None) in firing


def test_prometheus_evaluates_every_rule_without_error(live):
    rules = [r for g in live["rules"] for r in g["rules"]]
    assert len(rules) == 6
    for rule in rules:
        assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))


def test_render_dashboards_to_png(live, obs):
    module = obs.load_tool("render_dashboards")
    out = live["tmp"] / "png"
    code = module.main(["--prometheus", live["prom"].url, "--end", f"{live['load_end'] + 4:.0f}",
                        "--last", f"{LOAD_SECONDS + 40}", "--step", "1", "--rate-interval", "15s",
                        "--out", str(out)])
    assert code == 0
    for name in obs.load_dashboards():
        png = out / f"dashboard-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 30_000
