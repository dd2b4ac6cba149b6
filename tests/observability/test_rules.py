"""The chart's PrometheusRule: `promtool check rules` and `promtool test rules` (alerts_test.yaml)."""

from __future__ import annotations

import pathlib
import subprocess

import yaml

HERE = pathlib.Path(__file__).parent
ALERTS = {"PageantNoReadyReplicas", "PageantKVCacheSaturated", "PageantQueueGrowing", "PageantTimeToFirstTokenHigh",
          "PageantOperatorReconcileErrors", "PageantOperatorDown"}


def test_promtool_check_rules(promtool, rendered_rules_file):
    out = subprocess.run([promtool, "check", "rules", str(rendered_rules_file)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def test_promtool_test_rules(promtool, rendered_rules_file, tmp_path):
    cases = yaml.safe_load((HERE / "alerts_test.yaml").read_text())
    cases["rule_files"] = [str(rendered_rules_file)]
    tested = {t["alertname"] for case in cases["tests"] for t in case["alert_rule_test"]}
    assert tested == ALERTS, "every alert needs test cases"
    for case in cases["tests"]:  # each alert has a firing and a quiet evaluation
        assert any(t["exp_alerts"] for t in case["alert_rule_test"]) and any(not t["exp_alerts"] for t in case["alert_rule_test"])
    path = tmp_path / "alerts_test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_test_rules_catches_a_wrong_threshold(promtool, obs, tmp_path):
    """The unit tests can fail: with a KV-cache threshold of 0.99, the saturated case stops firing."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": obs.rule_groups("prometheusRule.alerts.kvCacheSaturated.threshold=0.99")}))
    cases = yaml.safe_load((HERE / "alerts_test.yaml").read_text())
    cases["rule_files"] = [str(rules)]
    path = tmp_path / "alerts_test.yaml"
    path.write_text(yaml.safe_dump(cases, sort_keys=False))
    out = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode != 0 and "PageantKVCacheSaturated" in out.stdout + out.stderr


def test_thresholds_and_toggles_come_from_values(obs):
    groups = obs.rule_groups("prometheusRule.alerts.ttftHigh.thresholdSeconds=0.75",
                             "prometheusRule.alerts.queueGrowing.enabled=false")
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    assert "PageantQueueGrowing" not in rules
    assert rules["PageantTimeToFirstTokenHigh"]["expr"].endswith("> 0.75")
    without_sm = obs.render_chart("prometheusRule.enabled=true")
    (rule,) = [o for o in without_sm if o["kind"] == "PrometheusRule"]
    assert "PageantOperatorDown" not in {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}


def test_every_alert_is_documented(obs):
    for group in obs.rule_groups():
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
