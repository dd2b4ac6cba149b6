"""A local observability stack: `pageant serve` engines, the operator's metrics endpoint and Debian's
`prometheus`, plus a load generator. tests/observability/test_live_prometheus.py builds on it, and
run on its own it regenerates the README's dashboard PNGs:

    python charts/pageant/tools/live_stack.py --seconds 60 --out charts/pageant/docs

Prometheus scrapes every second with the labels a PodMonitor/ServiceMonitor would add (namespace,
pod, pageant_dev_inferenceservice; the operator as job "<release>-pageant-operator-metrics"). The
operator's endpoint is its real registry (pageant.operator.metrics.OperatorMetrics) served as
`pageant operator run` serves it, fed with reconciliations the way pageant.operator.operations
records them: there is no cluster here, so no kopf loop runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

NAMESPACE = "ml"
OPERATOR_NAMESPACE = "pageant-system"
OPERATOR_JOB = "pt-pageant-operator-metrics"  # what a ServiceMonitor of release "pt" gives
PROMPTS = [("You are a helpful assistant. " * 6) + q for q in
           ("Tell me about Python.", "What is a list?", "Explain dictionaries.", "How do loops work?")]

OPERATOR_FEEDER = """
import random, sys, time
from prometheus_client import start_http_server
from pageant.operator.metrics import OperatorMetrics

m = OperatorMetrics()
start_http_server(int(sys.argv[1]), addr="127.0.0.1", registry=m.registry)
m.track("ml", "tiny-chat", True)
m.track("ml", "tiny-spare", True)
rng = random.Random(0)
while True:
    for handler in ("create", "update", "resync", "resync", "resync"):
        with m.timed(handler):
            time.sleep(rng.uniform(0.005, 0.05))
        if handler == "resync" and rng.random() < 0.2:
            m.reconciliations.labels(handler, "retry").inc()
            m.errors.labels(handler, "api_error").inc()
        else:
            m.reconciliations.labels(handler, "success").inc()
    time.sleep(0.2)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, timeout: float = 5) -> tuple[int, str]:
    """(status, body); status 0 when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def wait_http(url: str, procs: list[subprocess.Popen], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if http_get(url, 2)[0] == 200:
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: a process exited with {p.returncode}")
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout}s ({url})")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM (engines drain), then SIGKILL after 15 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class Prom:
    """A small client of the Prometheus HTTP API."""

    def __init__(self, url: str):
        self.url = url

    def api(self, path: str, **params) -> dict:
        status, body = http_get(f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}", 30)
        data = json.loads(body) if body else {}
        if status != 200 or data.get("status") != "success":
            raise RuntimeError(f"{path} {params}: {status} {body[:500]}")
        return data["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        return self.api("query", **params)["result"]

    def scalar(self, expr: str, at: float | None = None) -> float | None:
        result = self.query(expr, at)
        if len(result) > 1:
            raise ValueError(f"{expr} has {len(result)} series")
        return float(result[0]["value"][1]) if result else None


def engine_metric(port: int, name: str, model: str) -> float:
    """A sample from the engine's own /metrics."""
    _, text = http_get(f"http://127.0.0.1:{port}/metrics")
    m = re.search(rf'^{re.escape(name)}\{{model_name="{model}"\}} (\S+)$', text, re.M)
    if not m:
        raise KeyError(f"{name} not in the engine's /metrics")
    return float(m.group(1))


def start_engine(model: pathlib.Path | str, name: str, port: int, log: pathlib.Path) -> subprocess.Popen:
    """`pageant serve` on CPU with two sequences per batch, so a dozen clients overload it; n-gram
    speculative decoding on, so the dashboards' acceptance panels have data."""
    cmd = [sys.executable, "-m", "pageant.cli", "serve", "--model", str(model), "--served-model-name", name,
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32", "--seed", "0",
           "--max-num-seqs", "2", "--max-queued-requests", "256", "--num-kv-blocks", "32", "--block-size", "16",
           "--enable-prefix-caching", "--disable-log-requests", "--uvicorn-log-level", "warning",
           "--shutdown-timeout", "5", "--speculative-config",
           '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 3}']
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def start_operator_metrics(port: int, log: pathlib.Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", OPERATOR_FEEDER, str(port)], stdout=log.open("w"),
                            stderr=subprocess.STDOUT)


def start_prometheus(folder: pathlib.Path, port: int, engines: dict[str, int], operator_port: int,
                     rule_groups: list[dict] | None = None) -> subprocess.Popen:
    """Debian's prometheus, scraping every second, with ``rule_groups`` loaded."""
    import yaml

    binary = shutil.which("prometheus")
    if not binary:
        raise RuntimeError("prometheus not found: apt-get install prometheus")
    config: dict = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "900ms"},
                    "scrape_configs": [
                        {"job_name": "pageant-engines", "static_configs": [
                            {"targets": [f"127.0.0.1:{p}"], "labels": {
                                "namespace": NAMESPACE, "pod": pod_name(name), "pageant_dev_inferenceservice": name}}
                            for name, p in engines.items()]},
                        {"job_name": OPERATOR_JOB, "static_configs": [{
                            "targets": [f"127.0.0.1:{operator_port}"],
                            "labels": {"namespace": OPERATOR_NAMESPACE, "pod": "pt-pageant-operator-6f7d8-abcde"}}]},
                    ]}
    if rule_groups:
        (folder / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups}, sort_keys=False))
        config["rule_files"] = [str(folder / "rules.yaml")]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    return subprocess.Popen([binary, f"--config.file={folder / 'prometheus.yml'}",
                             f"--storage.tsdb.path={folder / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
                             "--log.level=warn"], stdout=(folder / "prometheus.log").open("w"), stderr=subprocess.STDOUT)


def pod_name(service: str) -> str:
    return f"{service}-5d8c7b9f4-x2x9k"


def run_load(base_url: str, seconds: float, model: str, workers: int = 12) -> dict[str, int]:
    """Closed-loop load with the openai client (streamed completions and chats, shared prompt
    prefixes) plus an invalid request now and then; returns {"ok": n, "rejected": n}."""
    import httpx
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    counts = {"ok": 0, "rejected": 0}
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(i: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            n += 1
            prompt = PROMPTS[(i + n) % len(PROMPTS)]
            if i == 0 and n % 3 == 0:  # invalid input: a 4xx the engine counts as a failure
                r = httpx.post(f"{base_url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": -1},
                               timeout=30)
                if not 400 <= r.status_code < 500:
                    raise AssertionError(f"invalid request answered {r.status_code}: {r.text}")
                with lock:
                    counts["rejected"] += 1
                continue
            if n % 2:
                for _ in client.completions.create(model=model, prompt=prompt, max_tokens=40, stream=True,
                                                   temperature=0.8, seed=n):
                    pass
            else:
                client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=40, temperature=0.8, seed=n)
            with lock:
                counts["ok"] += 1

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for f in [pool.submit(worker, i) for i in range(workers)]:
            f.result()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the local stack under load and render the dashboards.")
    parser.add_argument("--seconds", type=float, default=60, help="load duration (default 60)")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("."), help="where the PNGs go")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import render_dashboards
    from pageant.engine.testing import build_checkpoint

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        ckpt = build_checkpoint(tmp / "ckpt")
        ports = {"tiny-chat": free_port(), "tiny-spare": free_port()}
        op_port, prom_port = free_port(), free_port()
        procs = [start_engine(ckpt, n, p, tmp / f"{n}.log") for n, p in ports.items()]
        try:
            procs.append(start_operator_metrics(op_port, tmp / "operator.log"))
            procs.append(start_prometheus(tmp, prom_port, ports, op_port))
            prom = Prom(f"http://127.0.0.1:{prom_port}")
            wait_http(f"{prom.url}/-/ready", procs, 60, "prometheus")
            for n, p in ports.items():
                wait_http(f"http://127.0.0.1:{p}/ready", procs, 180, n)
            time.sleep(5)
            stop(procs[1])  # tiny-spare: a replica that served and died
            print(f"load for {args.seconds:g}s ...")
            start = time.time()
            print(run_load(f"http://127.0.0.1:{ports['tiny-chat']}", args.seconds, "tiny-chat"))
            time.sleep(10)
            for path in sorted(render_dashboards.DASHBOARDS.glob("*.json")):
                out = render_dashboards.render_dashboard(
                    json.loads(path.read_text()), prom.url, start - 15, time.time(), 1.0,
                    args.out / f"dashboard-{path.stem}.png", rate_interval="15s")
                print(f"wrote {out}")
        finally:
            for p in procs:
                stop(p)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
