"""`pageant serve` startup: clear errors for bad configurations, hub ids without network, adapters."""

from __future__ import annotations

import json
import os
import pathlib
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
    (["--tensor-parallel-size", "0"], "--tensor-parallel-size must be >= 1"),
    (["-pp", "0"], "--pipeline-parallel-size must be >= 1"),
    (["-tp", "2", "--nnodes", "2", "--master-port", "0"], "master_port must be a TCP port"),
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


# ---------------------------------------------------------------------- the vLLM-style command line


def test_every_flag_has_help_and_the_help_shows_defaults_without_markup(capsys):
    import re

    from pageant.engine.server.cli import build_parser, main

    for action in build_parser()._actions:
        assert action.help and action.help.strip(), f"{action.option_strings or action.dest} has no help"
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "(default:" in out and "(default: auto)" in out and "(default: 8000)" in out
    assert "``" not in out and not re.search(r":[a-z]+:`", out)
    for flag in ("MODEL", "--tokenizer", "--chat-template", "--trust-remote-code", "--generation-config",
                 "--enable-chunked-prefill", "--no-enable-chunked-prefill", "--enable-log-requests"):
        assert flag in out


@pytest.mark.parametrize("argv", [["--max-model", "64"], ["--enable-log"], ["--no-such-flag"],
                                  ["--max-model-len=64", "--hots", "x"]])
def test_abbreviated_and_unknown_flags_are_errors(capsys, argv):
    from pageant.cli import main as pageant_main
    from pageant.engine.server.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # the same through the `pageant` dispatcher
        pageant_main(["serve", *argv])
    assert exit_info.value.code == 2


def test_positional_model_and_model_flag(capsys, tiny_checkpoint):
    from pageant.engine.server.cli import build_parser, model_argument

    parse = build_parser().parse_args
    assert model_argument(parse([tiny_checkpoint])) == tiny_checkpoint
    assert model_argument(parse(["--port", "1", tiny_checkpoint, "--dtype", "float32"])) == tiny_checkpoint
    assert model_argument(parse(["--model", tiny_checkpoint])) == tiny_checkpoint
    assert model_argument(parse([tiny_checkpoint, "--model", tiny_checkpoint])) == tiny_checkpoint
    assert model_argument(parse([])) is None  # the bundled demo model
    assert _main(tiny_checkpoint, "--model", "/some/other/model") == 2
    err = capsys.readouterr().err
    assert "positional MODEL" in err and "--model" in err and "differ" in err
    assert _main("./no/such/positional/dir") == 2
    assert "no such directory" in capsys.readouterr().err


def test_tokenizer_flag_reaches_the_engine_config():
    from pageant.engine.server.cli import build_parser, engine_kwargs

    assert engine_kwargs(build_parser().parse_args(["--tokenizer", "/tok"]))["tokenizer"] == "/tok"
    assert "tokenizer" not in engine_kwargs(build_parser().parse_args([]))
    build_parser().parse_args(["--trust-remote-code"])  # accepted (and ignored)


def test_no_chunked_prefill_budget_covers_the_context(tmp_path, tiny_checkpoint):
    from pageant.engine.config import EngineConfig, ModelConfig
    from pageant.engine.server.cli import StartupError, build_parser, engine_kwargs

    parse = build_parser().parse_args
    default = EngineConfig.__dataclass_fields__["max_num_batched_tokens"].default
    # chunked prefill (the default, or asked for): the budget is what was given, else the engine's
    assert "max_num_batched_tokens" not in engine_kwargs(parse([]), tiny_checkpoint)
    assert engine_kwargs(parse(["--enable-chunked-prefill", "--max-num-batched-tokens", "64"]),
                         tiny_checkpoint)["max_num_batched_tokens"] == 64
    # without it: at least --max-model-len, else the checkpoint's context length
    no_chunks = ["--no-enable-chunked-prefill"]
    assert engine_kwargs(parse([*no_chunks, "--max-model-len", "8192"]))["max_num_batched_tokens"] == 8192
    assert engine_kwargs(parse([*no_chunks, "--max-model-len", "100"]))["max_num_batched_tokens"] == default
    long_ctx = tmp_path / "long"
    long_ctx.mkdir()
    config = json.loads((pathlib.Path(tiny_checkpoint) / "config.json").read_text())
    (long_ctx / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 5000}))
    kwargs = engine_kwargs(parse(["--no-enable-chunked-prefill", "--dtype", "float32"]), str(long_ctx))
    assert kwargs["max_num_batched_tokens"] == 5000 >= ModelConfig.from_pretrained(long_ctx).max_position_embeddings
    assert EngineConfig(model=str(long_ctx), **kwargs).max_num_batched_tokens == 5000
    assert engine_kwargs(parse(["--no-enable-chunked-prefill", "--max-num-batched-tokens", "6000"]),
                         str(long_ctx))["max_num_batched_tokens"] == 6000
    with pytest.raises(StartupError, match="smaller than --max-model-len"):
        engine_kwargs(parse(["--no-enable-chunked-prefill", "--max-num-batched-tokens", "256"]), str(long_ctx))


def test_chat_template_from_a_file_or_inline(capsys, tmp_path):
    from pageant.engine.server.cli import StartupError, load_chat_template

    assert load_chat_template(None) is None
    path = tmp_path / "template.jinja"
    path.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert load_chat_template(str(path)) == path.read_text()
    assert load_chat_template("{{ messages[0]['content'] }}\\n") == "{{ messages[0]['content'] }}\n"
    assert load_chat_template("{% for m in messages %}{% break %}{% endfor %}")  # transformers' loop controls
    with pytest.raises(StartupError, match="does not parse"):
        load_chat_template("{% for m in messages %}")
    with pytest.raises(StartupError, match="looks like a file path"):
        load_chat_template(str(tmp_path / "missing.jinja"))
    assert _main("--chat-template", "{% if %}") == 2
    err = capsys.readouterr().err
    assert "--chat-template does not parse" in err and "Traceback" not in err


def test_generation_config_defaults(tmp_path):
    from pageant.engine.server.cli import StartupError, generation_defaults

    model, other = tmp_path / "model", tmp_path / "other"
    model.mkdir()
    other.mkdir()
    assert generation_defaults("auto", str(model)) == {}  # no generation_config.json
    (model / "generation_config.json").write_text(json.dumps({
        "temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "max_new_tokens": 7,
        "do_sample": True, "eos_token_id": 2, "top_a": 3}))
    assert generation_defaults("auto", str(model)) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                                                       "repetition_penalty": 1.1, "max_tokens": 7}
    assert generation_defaults("vllm", str(model)) == {}
    (other / "generation_config.json").write_text(json.dumps({"temperature": 0.0}))
    assert generation_defaults(str(other), str(model)) == {"temperature": 0.0}
    assert generation_defaults(str(other / "generation_config.json"), str(model)) == {"temperature": 0.0}
    with pytest.raises(StartupError, match="no generation_config.json"):
        generation_defaults(str(tmp_path / "missing"), str(model))
    (other / "generation_config.json").write_text(json.dumps({"top_k": "many"}))
    with pytest.raises(StartupError, match="top_k must be a number"):
        generation_defaults(str(other), str(model))


def test_busy_port_fails_at_once_before_loading_the_model(tmp_path):
    """A nonexistent --model would fail later: the error must be the port's, within seconds."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "pageant.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
                              "--model", str(tmp_path / "no-such-model")], capture_output=True, text=True, timeout=60,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        elapsed = time.monotonic() - start
    assert out.returncode == 2, out.stderr
    assert f"port {port}" in out.stderr and "no such directory" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    assert elapsed < 5, elapsed


def test_loader_progress_bar_only_on_a_terminal(monkeypatch, tiny_checkpoint):
    import io

    import torch

    import pageant.kernels
    from pageant.engine.config import ModelConfig
    from pageant.engine.loader import load_model

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    path = pathlib.Path(tiny_checkpoint)
    for stream, drawn in ((io.StringIO(), False), (Terminal(), True)):
        monkeypatch.setattr(sys, "stderr", stream)
        load_model(path, ModelConfig.from_pretrained(path), pageant.kernels.get_ops("torch"), torch.float32,
                   torch.device("cpu"), 64)
        assert ("Loading weights" in stream.getvalue()) == drawn
