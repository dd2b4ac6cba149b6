"""Generate the Grafana dashboards shipped in the chart (files/dashboards/*.json).

The JSON files are build outputs of this module: edit the panels here, then run
``python charts/pageant/tools/dashboards.py`` (tests/observability fails when they drift). Keeping
the panels as data also lets the tests and tools/render_dashboards.py walk every query.

Engine series are grouped by ``namespace`` and ``model_name``: the engine labels every series with its
served model name (``spec.model.name`` of the InferenceService) and Prometheus adds the target's
namespace, whatever the scrape configuration (the operator's monitors, the chart's PodMonitor or
plain annotations). The operator's KEDA/HPA query selects the same two labels.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass, field

OUT = pathlib.Path(__file__).resolve().parents[1] / "files" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
BY = "namespace, model_name"
SEL = 'namespace=~"$namespace", model_name=~"$model"'
LEGEND = "{{namespace}}/{{model_name}}"
OP_SEL = 'namespace=~"$namespace"'


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and its legend."""

    expr: str
    legend: str = LEGEND


@dataclass(frozen=True)
class Panel:
    """A time-series panel (or a row header when ``row`` is set)."""

    title: str
    targets: tuple[Target, ...] = ()
    unit: str = "short"
    description: str = ""
    width: int = 12
    row: bool = False
    kind: str = "timeseries"
    overrides: tuple = field(default=())


def quantiles(metric: str, what: str) -> tuple[Target, ...]:
    """p50/p90/p99 of a histogram per InferenceService."""
    return tuple(
        Target(f"histogram_quantile({q}, sum by ({BY}, le) (rate({metric}_bucket{{{SEL}}}[$__rate_interval])))",
               f"p{int(q * 100)} {LEGEND}")
        for q in (0.5, 0.9, 0.99)
    )


def rate(metric: str, extra_by: str = "", legend: str = LEGEND) -> Target:
    by = f"{BY}, {extra_by}" if extra_by else BY
    return Target(f"sum by ({by}) (rate({metric}{{{SEL}}}[$__rate_interval]))", legend)


ENGINE_PANELS: tuple[Panel, ...] = (
    Panel("Load", row=True),
    Panel("Replicas serving", (Target(f"count by ({BY}) (vllm:num_requests_running{{{SEL}}})"),), "short",
          "Engine pods whose metrics Prometheus scrapes, per InferenceService.", width=6),
    Panel("Requests running", (Target(f"sum by ({BY}) (vllm:num_requests_running{{{SEL}}})"),), "short",
          "Requests in the running batch, summed over replicas.", width=6),
    Panel("Requests waiting", (Target(f"sum by ({BY}) (vllm:num_requests_waiting{{{SEL}}})"),), "short",
          "Requests queued for a slot, summed over replicas: the default autoscaling signal.", width=6),
    Panel("KV-cache usage", (
        Target(f"avg by ({BY}) (vllm:kv_cache_usage_perc{{{SEL}}})", f"avg {LEGEND}"),
        Target(f"max by ({BY}) (vllm:kv_cache_usage_perc{{{SEL}}})", f"max {LEGEND}"),
    ), "percentunit", "Fraction of KV-cache blocks in use (average and busiest replica).", width=6),
    Panel("Latency", row=True),
    Panel("Time to first token", quantiles("vllm:time_to_first_token_seconds", "TTFT"), "s",
          "p50/p90/p99 time from arrival to the first generated token."),
    Panel("Inter-token latency", quantiles("vllm:inter_token_latency_seconds", "ITL"), "s",
          "p50/p90/p99 time between two tokens of a stream."),
    Panel("End-to-end request latency", quantiles("vllm:e2e_request_latency_seconds", "E2E"), "s",
          "p50/p90/p99 time from arrival to the last token."),
    Panel("Queue time", quantiles("vllm:request_queue_time_seconds", "queue"), "s",
          "p50/p90/p99 time requests wait before they are scheduled."),
    Panel("Throughput", row=True),
    Panel("Tokens per second", (
        rate("vllm:prompt_tokens_total", legend=f"prompt {LEGEND}"),
        rate("vllm:generation_tokens_total", legend=f"generation {LEGEND}"),
    ), "short", "Prompt (prefill) and generated tokens per second."),
    Panel("Finished requests per second", (
        rate("vllm:request_success_total", "finished_reason", f"{{{{finished_reason}}}} {LEGEND}"),
    ), "reqps", "Requests that finished, by finish reason (stop, length, abort)."),
    Panel("Prefix-cache hit rate", (
        Target(f"sum by ({BY}) (rate(vllm:prefix_cache_hits_total{{{SEL}}}[$__rate_interval]))"
               f" / sum by ({BY}) (rate(vllm:prefix_cache_queries_total{{{SEL}}}[$__rate_interval]))"),
    ), "percentunit", "Prompt tokens found in the prefix cache / prompt tokens looked up.", width=8),
    Panel("Preemptions per second", (rate("vllm:num_preemptions_total"),), "short",
          "Running requests evicted to free KV cache (recomputed later): a sign of KV-cache pressure.", width=8),
    Panel("Errors per second by reason", (
        rate("vllm:request_failure_total", "reason", f"{{{{reason}}}} {LEGEND}"),
    ), "reqps", "Failed requests by reason (bad request, queue full, aborted, engine error...).", width=8),
    Panel("LoRA adapters", row=True),
    Panel("LoRA adapters in use", (
        Target(f"max by ({BY}, max_lora, running_lora_adapters, waiting_lora_adapters) "
               f"(vllm:lora_requests_info{{{SEL}}})",
               f"{LEGEND} running=[{{{{running_lora_adapters}}}}] waiting=[{{{{waiting_lora_adapters}}}}] "
               f"max={{{{max_lora}}}}"),
    ), "dateTimeFromNow", "Adapters with running / waiting requests (labels of vllm:lora_requests_info; the "
       "value is when the set last changed).", width=24, kind="table"),
    Panel("Speculative decoding", row=True),
    Panel("Speculative decoding acceptance rate", (
        Target(f"sum by ({BY}) (rate(vllm:spec_decode_num_accepted_tokens_total{{{SEL}}}[$__rate_interval]))"
               f" / sum by ({BY}) (rate(vllm:spec_decode_num_draft_tokens_total{{{SEL}}}[$__rate_interval]))"),
    ), "percentunit", "Accepted proposed tokens / proposed tokens (engines started with --speculative-config)."),
    Panel("Speculative decoding mean acceptance length", (
        Target(f"1 + sum by ({BY}) (rate(vllm:spec_decode_num_accepted_tokens_total{{{SEL}}}[$__rate_interval]))"
               f" / sum by ({BY}) (rate(vllm:spec_decode_num_drafts_total{{{SEL}}}[$__rate_interval]))"),
    ), "short", "Tokens a verifying step emits per request: 1 + accepted tokens / drafts."),
)

OPERATOR_PANELS: tuple[Panel, ...] = (
    Panel("Operator", row=True),
    Panel("Managed InferenceServices", (
        Target(f"sum by (namespace, pod) (pageant_operator_managed_inferenceservices{{{OP_SEL}}})", "{{pod}}"),
    ), "short", "InferenceServices the operator reconciles.", width=8),
    Panel("Reconciliations per second", (
        Target(f"sum by (handler, result) (rate(pageant_operator_reconciliations_total{{{OP_SEL}}}[$__rate_interval]))",
               "{{handler}} {{result}}"),
    ), "ops", "Handler runs by handler and result.", width=8),
    Panel("Reconcile errors per second", (
        Target(f"sum by (handler, reason) (rate(pageant_operator_reconcile_errors_total{{{OP_SEL}}}[$__rate_interval]))",
               "{{handler}} {{reason}}"),
    ), "ops", "Failed handler runs by handler and reason (API errors, invalid specs, conflicts...).", width=8),
    Panel("Reconcile duration", tuple(
        Target(f"histogram_quantile({q}, sum by (handler, le) "
               f"(rate(pageant_operator_reconcile_duration_seconds_bucket{{{OP_SEL}}}[$__rate_interval])))",
               f"p{int(q * 100)} {{{{handler}}}}")
        for q in (0.5, 0.99)
    ), "s", "p50/p99 handler duration by handler.", width=12),
    Panel("Error ratio", (
        Target(f"sum by (handler) (rate(pageant_operator_reconcile_errors_total{{{OP_SEL}}}[$__rate_interval]))"
               f" / sum by (handler) (rate(pageant_operator_reconciliations_total{{{OP_SEL}}}[$__rate_interval]))",
               "{{handler}}"),
    ), "percentunit", "Share of handler runs that failed.", width=12),
)


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DS,
        "query": {"query": query, "refId": f"{name}-query"}, "definition": query,
        "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "options": [],
    }


def _panel_json(panel: Panel, pid: int, x: int, y: int) -> dict:
    if panel.row:
        return {"id": pid, "type": "row", "title": panel.title, "collapsed": False, "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}}
    out = {
        "id": pid, "type": panel.kind, "title": panel.title, "description": panel.description, "datasource": DS,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DS, "expr": t.expr, "legendFormat": t.legend,
                     "range": panel.kind != "table", "instant": panel.kind == "table"}
                    for i, t in enumerate(panel.targets)],
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
    }
    if panel.kind == "timeseries":
        out["fieldConfig"]["defaults"]["custom"] = {"lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
        out["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                          "tooltip": {"mode": "multi", "sort": "desc"}}
    else:
        out["transformations"] = [{"id": "labelsToFields", "options": {}}]
    return out


def dashboard(uid: str, title: str, description: str, panels: tuple[Panel, ...], variables: list[dict]) -> dict:
    """A Grafana dashboard (schemaVersion 39) with a Prometheus data-source variable."""
    out, x, y = [], 0, 0
    for pid, panel in enumerate(panels, start=1):
        if panel.row or x + panel.width > 24:
            x, y = 0, y + (8 if x else 0)
        out.append(_panel_json(panel, pid, x, y))
        if panel.row:
            y += 1
        else:
            x += panel.width
    templating = [{"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                   "current": {}, "hide": 0, "options": [], "refresh": 1}] + variables
    return {
        "uid": uid, "title": title, "description": description, "tags": ["pageant", "llm"],
        "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1, "timezone": "browser",
        "time": {"from": "now-1h", "to": "now"}, "refresh": "30s",
        "templating": {"list": templating}, "annotations": {"list": []}, "links": [], "panels": out,
    }


DASHBOARDS: dict[str, dict] = {
    "engine": dashboard(
        "pageant-engine", "Pageant / Engine fleet", "Pageant engine pods per InferenceService: load, latency, "
        "throughput, prefix cache, preemptions, LoRA adapters, errors.", ENGINE_PANELS,
        [_variable("namespace", "Namespace", "label_values(vllm:num_requests_running, namespace)"),
         _variable("model", "Model (InferenceService)",
                   'label_values(vllm:num_requests_running{namespace=~"$namespace"}, model_name)')]),
    "operator": dashboard(
        "pageant-operator", "Pageant / Operator", "The Pageant operator: reconciliations, errors, durations, "
        "managed InferenceServices.", OPERATOR_PANELS,
        [_variable("namespace", "Namespace", "label_values(pageant_operator_managed_inferenceservices, namespace)")]),
}


def render_json(name: str) -> str:
    return json.dumps(DASHBOARDS[name], indent=2, sort_keys=False) + "\n"


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    for name in DASHBOARDS:
        (OUT / f"{name}.json").write_text(render_json(name))
        print(f"wrote {OUT / f'{name}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
