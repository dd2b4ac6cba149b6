"""`pageant serve` startup: clear errors for bad configurations, hub ids without network, adapters."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest


def _run_serve(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    # A port nobody listens on: a test that unexpectedly gets past startup fails instead of serving.
    return subprocess.run([sys.executable, "-m", "pageant.cli", "serve", "--host", "127.0.0.1", "--port",
                           str(_closed_port()), "--shutdown-timeout", "0", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _main(*args: str) -> int:
    """Run `pageant serve` in-process (for configurations that fail before serving)."""
    from pageant.engine.server.cli import main

    return main(["--host", "127.0.0.1", "--port", str(_closed_port()), *args])


def test_help_lists_the_flags(capsys):
    from pageant.engine.server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--served-model-name", "--api-key", "--max-queued-requests", "--shutdown-timeout",
                 "--lora-modules-file", "--allowed-lora-root", "--tensor-parallel-size", "--kv-cache-memory-gib",
                 "--attention-backend", "--enable-prefix-caching", "--max-log-len", "--disable-log-requests",
                 "--lora-unload-timeout"):
        assert flag in out


def test_hub_id_without_network_fails_fast(tmp_path):
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}", "HF_HOME": str(tmp_path),
           "HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    start = time.monotonic()
    out = _run_serve("--model", "some-org/some-model", env=env, timeout=90)
    assert out.returncode == 2, out.stderr
    assert "could not download 'some-org/some-model' from the Hugging Face Hub" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - start < 60


def test_hub_id_offline_mode_is_clear(tmp_path):
    out = _run_serve("--model", "some-org/some-model", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert out.returncode == 2 and "HF_HUB_OFFLINE" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("args,message", [
    (["--tensor-parallel-size", "2"], "only 1 is supported"),
    (["--model", "./no/such/dir"], "no such directory"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1"),
    (["--lora-modules", "broken"], "expected NAME=PATH"),
    (["--allowed-lora-root", "/no/such/root"], "no such directory"),
    (["--lora-unload-timeout", "-1"], "--lora-unload-timeout must be a finite number >= 0"),
    (["--lora-unload-timeout", "nan"], "--lora-unload-timeout must be a finite number >= 0"),
])
def test_bad_flags_are_clear_startup_errors(capsys, args, message):
    assert _main(*args) == 2
    assert message in capsys.readouterr().err


def test_bad_adapters_file_is_a_startup_error(capsys, tmp_path):
    bad = tmp_path / "adapters.json"
    bad.write_text("{not json")
    assert _main("--lora-modules-file", str(bad)) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_adapter_outside_allowed_root_is_refused(capsys, tmp_path, tiny_checkpoint):
    root = tmp_path / "root"
    root.mkdir()
    assert _main("--model", str(tiny_checkpoint), "--allowed-lora-root", str(root),
                 "--lora-modules", f"sql={tmp_path / 'elsewhere'}") == 2
    assert "outside --allowed-lora-root" in capsys.readouterr().err


def test_adapters_need_enable_lora(capsys, tmp_path, tiny_checkpoint):
    adapters = tmp_path / "adapters.json"
    adapters.write_text(json.dumps({"adapters": [{"name": "sql", "path": str(tmp_path)}]}))
    assert _main("--model", str(tiny_checkpoint), "--lora-modules-file", str(adapters)) == 2
    err = capsys.readouterr().err
    assert "pass --enable-lora" in err and "sql" in err


def test_broken_adapter_is_a_startup_error(capsys, tmp_path, tiny_checkpoint):
    assert _main("--model", str(tiny_checkpoint), "--enable-lora", "--lora-modules", f"sql={tmp_path}") == 2
    err = capsys.readouterr().err
    assert "adapter 'sql'" in err and "adapter_config.json" in err


def test_empty_adapters_file_serves_and_is_watched(serve, tmp_path):
    """Also: the API key comes from PAGEANT_API_KEY when --api-key is not given."""
    adapters = tmp_path / "adapters.json"
    adapters.write_text(json.dumps({"adapters": []}))
    server = serve("--enable-lora", "--max-loras", "2", "--lora-modules-file", str(adapters), "--served-model-name",
                   "base", "--uvicorn-log-level", "warning", env={"PAGEANT_API_KEY": "from-env"})
    assert httpx.get(f"{server.base_url}/v1/models").status_code == 401
    models = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": "Bearer from-env"}).json()["data"]
    assert [m["id"] for m in models] == ["base"]
    assert server.metric("vllm:lora_requests_info", {"max_lora": "2"}) > 0
    # A later bad edit is reported in the log and does not take the server down.
    adapters.write_text("{oops")
    deadline = time.monotonic() + 15
    while "not valid JSON" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "not valid JSON" in server.output()
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_dtype_auto(tmp_path):
    from pageant.engine.server.cli import resolve_device_dtype

    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float16"}))
    assert resolve_device_dtype("cpu", "auto", str(tmp_path)) == ("cpu", "float32")
    assert resolve_device_dtype("cuda", "auto", str(tmp_path)) == ("cuda", "float16")
    (tmp_path / "config.json").write_text(json.dumps({"torch_dtype": "float32"}))
    assert resolve_device_dtype("cuda", "auto", str(tmp_path)) == ("cuda", "bfloat16")
    assert resolve_device_dtype("cuda:0", "half", str(tmp_path)) == ("cuda:0", "float16")


def test_engine_flags_reach_the_engine_config():
    """Every engine knob of `pageant serve` becomes the EngineConfig field of the same name."""
    from pageant.engine.server.cli import build_parser, engine_kwargs

    args = build_parser().parse_args([
        "--max-model-len", "512", "--max-num-seqs", "7", "--max-num-batched-tokens", "300", "--block-size", "8",
        "--num-kv-blocks", "99", "--attention-backend", "triton", "--enable-prefix-caching", "--enforce-eager",
        "--seed", "3",
    ])
    kwargs = engine_kwargs(args)
    assert kwargs == {**kwargs, "max_model_len": 512, "max_num_seqs": 7, "max_num_batched_tokens": 300,
                      "block_size": 8, "num_kv_blocks": 99, "attention_backend": "triton",
                      "enable_prefix_caching": True, "enforce_eager": True, "seed": 3}
    assert "enforce_eager" not in engine_kwargs(build_parser().parse_args([]))
