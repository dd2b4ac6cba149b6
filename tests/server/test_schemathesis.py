"""Property-based fuzzing of the whole API from our own /openapi.json (schemathesis CLI, bounded)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import httpx

API_KEY = "fuzz-key"
CHECKS = ",".join([
    "not_a_server_error",  # no 5xx, whatever the input
    "status_code_conformance",  # every status we send is documented
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",  # bodies (JSON and SSE events) match the documented schemas
])


def test_schemathesis_finds_no_server_errors_or_schema_violations(serve, tmp_path):
    root = tmp_path / "adapters"  # LoRA on, so the runtime adapter endpoints are fuzzed past "not enabled"
    root.mkdir()
    server = serve("--api-key", API_KEY, "--max-model-len", "128", "--num-kv-blocks", "64", "--disable-log-requests",
                   "--uvicorn-log-level", "warning", "--enable-lora", "--allowed-lora-root", str(root),
                   "--enable-prefix-caching")
    st = pathlib.Path(sys.executable).with_name("schemathesis")
    cmd = [str(st), "run", f"{server.base_url}/openapi.json", "-H", f"Authorization: Bearer {API_KEY}",
           "--checks", CHECKS, "--max-examples", "10", "--seed", "1", "--no-shrink", "--workers", "1",
           "--generation-database", "none", "--request-timeout", "60", "--no-color"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]
    spec = httpx.get(f"{server.base_url}/openapi.json", headers={"Authorization": f"Bearer {API_KEY}"}).json()
    num_ops = sum(len(methods) for methods in spec["paths"].values())
    assert num_ops >= 10
    assert f"{num_ops} selected / {num_ops} total" in out.stdout  # every operation was fuzzed
    assert "passed" in out.stdout
    assert httpx.get(f"{server.base_url}/health").status_code == 200  # the engine loop survived it all
