"""``pageant serve``: load a model and serve the OpenAI-compatible API with uvicorn (see ``DESCRIPTION``,
which ``--help`` shows). Flag names follow ``vllm serve`` where vLLM has the same knob.

Startup order: flags, then the port is bound (so a busy port fails in well under a second, before a
model load that can take minutes), then the model is resolved and loaded, then uvicorn serves on the
socket bound at the start.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import pathlib
import signal
import socket
import sys
import time

from pageant.engine.server.cli_args import StartupError, build_parser, engine_kwargs  # noqa: F401 (re-exported)

logger = logging.getLogger("pageant.server")


def resolve_model(model: str | None, *, revision: str | None, download_dir: str | None) -> tuple[str, str]:
    """(local checkpoint directory, default served name)."""
    if model is None:
        from pageant.engine.demo import DEMO_MODEL_NAME, checkpoint_path

        return checkpoint_path(), DEMO_MODEL_NAME
    path = pathlib.Path(model).expanduser()
    if path.is_dir():
        return str(path), path.resolve().name
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or not model.strip():
        raise StartupError(f"--model {model!r}: no such directory (and not a Hugging Face Hub id)")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of the engine extra
        raise StartupError("huggingface_hub is not installed: pass a local checkpoint directory") from None
    logger.info("downloading %s from the Hugging Face Hub (revision %s)", model, revision or "main")
    try:
        local = snapshot_download(
            repo_id=model, revision=revision, cache_dir=download_dir, token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        )
    except Exception as exc:  # noqa: BLE001 - any failure (offline, 401, 404) is one clear startup error
        raise StartupError(
            f"could not download {model!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            "Without network access pass a local checkpoint directory, or pre-populate the cache and set "
            "HF_HUB_OFFLINE=1; for gated models set HF_TOKEN."
        ) from None
    return local, model


def resolve_device_dtype(device: str | None, dtype: str, model_dir: str) -> tuple[str, str]:
    """``--device`` default (cuda when available) and ``--dtype auto`` made concrete."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"half": "float16", "float": "float32"}.get(dtype, dtype)
    if dtype == "auto":
        if device.startswith("cpu"):
            dtype = "float32"
        else:
            try:
                config = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
            except (OSError, ValueError):
                config = {}
            stored = config.get("torch_dtype") or config.get("dtype")
            dtype = stored if stored in ("float16", "bfloat16") else "bfloat16"
    return device, dtype


def model_argument(args: argparse.Namespace) -> str | None:
    """The model from the positional MODEL or ``--model`` (the same value may be given both ways)."""
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise StartupError(f"the positional MODEL ({args.model_tag!r}) and --model ({args.model!r}) differ: "
                           "give the model once")
    return args.model_tag if args.model_tag is not None else args.model


def load_chat_template(value: str | None) -> str | None:
    """``--chat-template``: the text of a template file, or the value itself as an inline template
    (with backslash escapes such as ``\\n`` decoded, as vLLM does); it must parse as Jinja."""
    if value is None:
        return None
    try:
        text = pathlib.Path(value).expanduser().read_text()
    except (OSError, ValueError) as exc:
        if not any(c in value for c in "{}\n"):
            raise StartupError(f"--chat-template {value!r} looks like a file path but cannot be read: {exc}") from None
        try:
            text = value.encode("latin-1", "backslashreplace").decode("unicode_escape")
        except UnicodeDecodeError:
            text = value
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:  # pragma: no cover - other transformers versions: plain Jinja with loop controls
        import jinja2.sandbox

        def compile_template(source: str):
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"])
            return env.from_string(source)
    try:
        compile_template(text)
    except Exception as exc:  # noqa: BLE001 - jinja2.TemplateSyntaxError and friends
        raise StartupError(f"--chat-template does not parse as a Jinja template: {exc}") from None
    return text


# generation_config.json keys that become default sampling parameters (vLLM's list), with vLLM's names
GENERATION_DEFAULT_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}


def generation_defaults(value: str, model_dir: str) -> dict:
    """``--generation-config``: the default sampling parameters from a generation_config.json
    (``auto``: the checkpoint's, ``vllm``: none, else the file in that folder). ``max_tokens`` (from
    ``max_new_tokens``) caps every request's; the others apply where a request leaves them unset."""
    if value == "vllm":
        return {}
    if value == "auto":
        path = pathlib.Path(model_dir) / "generation_config.json"
        if not path.is_file():
            return {}
    else:
        path = pathlib.Path(value).expanduser()
        if path.is_dir():
            path = path / "generation_config.json"
        if not path.is_file():
            raise StartupError(f"--generation-config {value!r}: no generation_config.json there (give a folder "
                               "holding one, or auto, or vllm)")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StartupError(f"--generation-config: cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise StartupError(f"--generation-config: {path} is not a JSON object")
    defaults = {}
    for key, name in GENERATION_DEFAULT_KEYS.items():
        v = config.get(key)
        if v is None:
            continue
        ok = isinstance(v, int) if key in ("top_k", "max_new_tokens") else isinstance(v, (int, float))
        if not ok or isinstance(v, bool):
            raise StartupError(f"--generation-config: {path}: {key} must be a number, got {v!r}")
        defaults[name] = v
    if "max_tokens" in defaults and defaults["max_tokens"] < 1:
        raise StartupError(f"--generation-config: {path}: max_new_tokens must be >= 1")
    return defaults


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (host, port) now, as uvicorn would (SO_REUSEADDR), and hold it until uvicorn listens on it:
    a busy port is one clear error at once instead of after the model load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): is another server using "
                           f"port {port}? Stop it or pass another --port") from None
    sock.set_inheritable(True)
    return sock


def api_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}/v1" if ":" in host else f"http://{host}:{port}/v1"


def _check_args(args: argparse.Namespace) -> None:
    for name in ("tensor_parallel_size", "pipeline_parallel_size", "nnodes", "max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks", "max_model_len",
                 "max_loras", "max_lora_rank", "max_n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise StartupError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise StartupError("--max-queued-requests must be >= 0")
    for name, least in (("h11_max_incomplete_event_size", 1), ("h11_max_header_count", 1), ("max_stop_strings", 0),
                        ("max_stop_chars", 0), ("max_stop_token_ids", 0)):
        if getattr(args, name) < least:
            raise StartupError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if not 0 <= args.request_header_timeout < float("inf"):
        raise StartupError("--request-header-timeout must be a finite number >= 0")
    if not 0 <= args.lora_unload_timeout < float("inf"):
        raise StartupError("--lora-unload-timeout must be a finite number >= 0")
    if args.shutdown_timeout < 0:
        raise StartupError("--shutdown-timeout must be >= 0")
    if args.allowed_lora_root is not None and not os.path.isdir(args.allowed_lora_root):
        raise StartupError(f"--allowed-lora-root {args.allowed_lora_root}: no such directory")
    if args.enable_auto_tool_choice and not args.tool_call_parser:
        raise StartupError("--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json, mistral, pythonic)")


def _server_config(args: argparse.Namespace, api_keys: list[str]):
    from pageant.engine.server.adapters_config import parse_lora_modules
    from pageant.engine.sampling_params import StopLimits
    from pageant.engine.server.app import ServerConfig

    return ServerConfig(
        served_model_names=args.served_model_name or [], api_keys=api_keys,
        max_queued_requests=args.max_queued_requests, shutdown_timeout=args.shutdown_timeout,
        max_log_len=args.max_log_len,
        log_requests=args.enable_log_requests and not args.disable_log_requests,
        max_body_bytes=args.max_request_body_bytes, max_n=args.max_n,
        engine_stall_timeout=args.engine_stall_timeout, lora_modules=parse_lora_modules(args.lora_modules),
        lora_modules_file=args.lora_modules_file, allowed_lora_root=args.allowed_lora_root,
        max_loras=args.max_loras if args.enable_lora else 0, lora_unload_timeout=args.lora_unload_timeout,
        max_header_bytes=args.h11_max_incomplete_event_size, max_header_count=args.h11_max_header_count,
        header_timeout=args.request_header_timeout,
        stop_limits=StopLimits(args.max_stop_strings, args.max_stop_chars, args.max_stop_token_ids),
        tool_call_parser=args.tool_call_parser, enable_auto_tool_choice=args.enable_auto_tool_choice,
        reasoning_parser=args.reasoning_parser,
    )


def _build_engine(model_dir: str, kwargs: dict):
    from pageant.engine import LLMEngine

    config_fields = set()
    try:
        from pageant.engine import EngineConfig

        config_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    except Exception:  # noqa: BLE001 - older engines: pass what we have
        pass
    unsupported = [k for k in ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras", "allowed_lora_root",
                               "enable_prefix_caching")
                   if k in kwargs and config_fields and k not in config_fields]
    for key in unsupported:
        logger.warning("this engine has no %s setting yet; ignoring --%s", key, key.replace("_", "-"))
        kwargs.pop(key)
    return LLMEngine.from_kwargs(model=model_dir, **kwargs)


def _run_headless(model_dir: str, kwargs: dict) -> int:
    from pageant.engine import EngineConfig
    from pageant.engine.distributed.headless import run_headless

    try:
        return run_headless(EngineConfig(model=model_dir, **kwargs))
    except ValueError as exc:
        print(f"pageant serve: error: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_keys = args.api_key or ([os.environ["PAGEANT_API_KEY"]] if os.environ.get("PAGEANT_API_KEY") else [])
    sock: socket.socket | None = None
    try:
        try:
            if not args.headless:  # first: a busy port must not wait for the model load
                sock = reserve_port(args.host, args.port)
            _check_args(args)
            model = model_argument(args)
            chat_template = load_chat_template(args.chat_template)
            config = _server_config(args, api_keys)
            from pageant.engine.server.adapters_config import validate_specs, read_adapters_file, engine_supports_lora

            if args.lora_modules_file:  # a bad file is a startup error; later bad edits are only logged
                read_adapters_file(args.lora_modules_file)
            model_dir, default_name = resolve_model(model, revision=args.revision, download_dir=args.download_dir)
            names = config.served_model_names or [default_name]
            config.served_model_names = names
            validate_specs(config.lora_modules, allowed_root=args.allowed_lora_root, base_names=names)
            args.device, args.dtype = resolve_device_dtype(args.device, args.dtype, model_dir)
            sampling_defaults = generation_defaults(args.generation_config, model_dir)
            kwargs = engine_kwargs(args, model_dir)
        except (StartupError, ValueError, FileNotFoundError, OverflowError) as exc:
            print(f"pageant serve: error: {exc}", file=sys.stderr)
            return 2
        if args.headless:
            return _run_headless(model_dir, kwargs)
        if sampling_defaults:
            logger.info("default sampling parameters from the generation config: %s (--generation-config vllm "
                        "ignores them)", sampling_defaults)

        try:
            engine = _build_engine(model_dir, kwargs)
        except Exception as exc:  # noqa: BLE001 - a model that cannot load is one clear line, not a traceback
            logger.debug("engine start failed", exc_info=True)
            print(f"pageant serve: error: could not start the engine for {model_dir}: {type(exc).__name__}: {exc}",
                  file=sys.stderr)
            return 2

        from pageant.engine.server.adapters_config import AdapterConfigError
        from pageant.engine.server.app import build_app

        app = build_app(engine, config)
        serving = app.state.serving
        serving.default_sampling_params = sampling_defaults
        if args.allowed_media_domains:  # http(s) image URLs from these hosts (pageant.engine.multimodal.media)
            from pageant.engine.multimodal.media import MediaLimits

            serving.media = MediaLimits(allowed_domains=tuple(args.allowed_media_domains))
        if chat_template is not None:
            serving.tokenizer.chat_template = chat_template
        try:
            app.state.adapters.load_at_startup()
        except (AdapterConfigError, OSError) as exc:
            print(f"pageant serve: error: {exc}", file=sys.stderr)
            return 2
        if args.enable_lora and not engine_supports_lora(engine):
            logger.warning("--enable-lora: this engine cannot load adapters; serving the base model only")
        logger.info("serving model %s at %s (API key %s)", ", ".join(repr(n) for n in names),
                    api_url(args.host, args.port), "required" if api_keys else "not required")
        try:
            return serve_app(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                             shutdown_timeout=args.shutdown_timeout, sock=sock)
        finally:
            engine.shutdown()  # the worker processes of a tensor/pipeline-parallel engine
    finally:
        if sock is not None:
            sock.close()


def serve_app(app, *, host: str, port: int, log_level: str, shutdown_timeout: float,
              sock: socket.socket | None = None) -> int:
    """Run uvicorn until shutdown; on ``sock`` (bound by ``reserve_port``) when given."""
    import uvicorn

    from pageant.engine.server.app import drain

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that SIGTERM/SIGINT drain first (see DESCRIPTION)."""

        draining = False
        loop: asyncio.AbstractEventLoop | None = None
        fatal_since: float | None = None  # when the engine failed for good (a parallel rank is gone)

        async def on_tick(self, counter: int) -> bool:
            should_exit = await super().on_tick(counter)
            fatal = app.state.async_engine.fatal_error
            if fatal is not None:
                now = time.monotonic()
                if self.fatal_since is None:
                    self.fatal_since = now
                    logger.error("the engine failed (%s): failing requests in flight, then exiting", fatal)
                # the engine thread fails the requests in flight first (error events); then exit 1
                if app.state.async_engine.num_inflight == 0 or now - self.fatal_since > 5.0:
                    self.should_exit = True
                    return True
            return should_exit

        async def startup(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)
            if self.started and sockets is not None:  # uvicorn logs no address for sockets it was given
                logger.info("listening on %s (SIGTERM or Ctrl-C drains and stops)", api_url(host, port)[:-3])

        def handle_exit(self, sig, frame):  # runs in the main thread, which runs the event loop
            if self.draining or self.loop is None:
                self.should_exit = True
                if sig == signal.SIGINT and self.draining:
                    self.force_exit = True
                return
            self.draining = True
            logger.info("received %s: draining (up to %.0fs)", signal.Signals(sig).name, shutdown_timeout)
            self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._drain()))

        async def _drain(self):
            try:
                await drain(app, shutdown_timeout)
            finally:
                self.should_exit = True

    from pageant.engine.server.http_limits import DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_HEADER_BYTES, LimitedH11Protocol

    limits = getattr(app.state, "config", None)  # the ServerConfig: header size limit and deadline
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=log_level in ("debug", "trace"),
                            http=LimitedH11Protocol.with_timeout(getattr(limits, "header_timeout",
                                                                         DEFAULT_HEADER_TIMEOUT)),
                            h11_max_incomplete_event_size=getattr(limits, "max_header_bytes", DEFAULT_MAX_HEADER_BYTES))
    server = DrainingServer(config)
    server.run(sockets=None if sock is None else [sock])
    return 0 if server.started and server.fatal_since is None else 1
