"""`pageant operator run` as a process: kubeconfig login, /healthz, /metrics, reconciling, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import pytest
import yaml


pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(120)]


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    try:
        async with session.get(url) as r:
            return r.status, await r.text()
    except aiohttp.ClientError:
        return 0, ""


@pytest.mark.parametrize("scope", [["--namespace", "ml"], []], ids=["namespaced", "cluster-wide"])
async def test_operator_run_process(cluster_api, make_body, wait, tmp_path, scope, unused_tcp_port_factory):
    url, cluster = cluster_api
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "test", "user": {"token": "not-checked"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": "ml"}}]}))
    metrics_port, health_port = unused_tcp_port_factory(), unused_tcp_port_factory()
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pageant.cli", "operator", "run", *scope, "--metrics-port",
        str(metrics_port), "--health-port", str(health_port), "--resync-seconds", "0.5",
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        async with aiohttp.ClientSession() as session:
            async def healthy() -> bool:
                return (await _get(session, f"http://127.0.0.1:{health_port}/healthz"))[0] == 200

            await wait(healthy, timeout=30, what="/healthz 200")
            await cluster.apply_is(make_body())
            await wait(lambda: cluster.get("Deployment", "ml", "demo"), timeout=30, what="Deployment")
            success = 'pageant_operator_reconciliations_total{handler="create",result="success"} 1.0'

            async def counted() -> bool:
                return success in (await _get(session, f"http://127.0.0.1:{metrics_port}/metrics"))[1]

            await wait(counted, timeout=30, what="the create counted in /metrics")
            status, text = await _get(session, f"http://127.0.0.1:{metrics_port}/metrics")
            assert status == 200
            for name in ("pageant_operator_reconciliations_total", "pageant_operator_reconcile_errors_total",
                         "pageant_operator_reconcile_duration_seconds_bucket",
                         "pageant_operator_managed_inferenceservices"):
                assert name in text, name
            assert "pageant_operator_managed_inferenceservices 1.0" in text
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode == 0, (await proc.stdout.read()).decode()[-3000:]
    except AssertionError:
        if proc.returncode is None:
            proc.kill()
        output = (await proc.stdout.read()).decode()
        raise AssertionError(f"operator output:\n{output[-4000:]}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
