"""``pageant serve``: load a model (a directory, a Hugging Face Hub id, or the bundled demo) and serve
the OpenAI-compatible API with uvicorn. Flag names follow ``vllm serve`` where vLLM has the same knob.

SIGTERM (and the first Ctrl-C) drains: ``/ready`` turns 503 at once, new requests get 503, in-flight
requests get up to ``--shutdown-timeout`` seconds to finish, then the process exits 0.
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
import sys

logger = logging.getLogger("pageant.server")


class StartupError(Exception):
    """A configuration problem reported as one clear line before exiting with status 2."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pageant serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--model", default=None,
                   help="checkpoint directory or Hugging Face Hub id (default: the bundled demo model)")
    m.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in `model` (default: the model's name)")
    m.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    m.add_argument("--download-dir", default=None, help="Hub cache directory (default: huggingface_hub's)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "half", "float"],
                   help="auto: float32 on CPU; on GPU the checkpoint's float16/bfloat16, else bfloat16")
    m.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    m.add_argument("--seed", type=int, default=None)
    e = ap.add_argument_group("engine")
    e.add_argument("--max-model-len", type=int, default=None)
    e.add_argument("--max-num-seqs", type=int, default=None)
    e.add_argument("--max-num-batched-tokens", type=int, default=None)
    e.add_argument("--block-size", type=int, default=None)
    e.add_argument("--num-kv-blocks", type=int, default=None, help="KV pool size in blocks (overrides memory sizing)")
    e.add_argument("--kv-cache-memory-gib", type=float, default=None, help="KV pool size on CPU")
    e.add_argument("--gpu-memory-utilization", type=float, default=None)
    e.add_argument("--attention-backend", choices=["torch", "triton"], default=None)
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None)
    e.add_argument("--enforce-eager", action="store_true", default=None,
                   help="never capture CUDA graphs (decode runs eagerly, as prefill always does)")
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="only 1 is supported")
    lora = ap.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action="store_true")
    lora.add_argument("--max-loras", type=int, default=1)
    lora.add_argument("--max-lora-rank", type=int, default=16)
    lora.add_argument("--max-cpu-loras", type=int, default=None)
    lora.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH")
    lora.add_argument("--lora-modules-file", default=None,
                      help='JSON file {"adapters": [{"name": ..., "path": ...}]}, re-read when it changes')
    lora.add_argument("--allowed-lora-root", default=None, help="adapter paths must be under this directory")
    lora.add_argument("--lora-unload-timeout", type=float, default=30.0,
                      help="seconds POST /v1/unload_lora_adapter waits for the adapter's requests to end "
                           "before refusing with 409")
    s = ap.add_argument_group("server")
    s.add_argument("--host", default="0.0.0.0")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", default=None,
                   help="required bearer token (repeatable; default: env PAGEANT_API_KEY)")
    s.add_argument("--max-queued-requests", type=int, default=None,
                   help="waiting requests beyond which new ones get 429 (default: unlimited)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    s.add_argument("--max-request-body-bytes", type=int, default=4 * 1024 * 1024)
    s.add_argument("--max-n", type=int, default=16, help="largest `n` a request may ask for")
    s.add_argument("--engine-stall-timeout", type=float, default=120.0,
                   help="/health turns 503 when the engine loop makes no progress for this long")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    s.add_argument("--max-log-len", type=int, default=None, help="truncate logged prompts to this many chars")
    s.add_argument("--disable-log-requests", action="store_true")
    return ap


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


def engine_kwargs(args: argparse.Namespace) -> dict:
    """The engine's keyword arguments: only the flags that were given (the engine has the defaults)."""
    keys = ["dtype", "device", "seed", "max_model_len", "max_num_seqs", "max_num_batched_tokens", "block_size",
            "num_kv_blocks", "kv_cache_memory_gib", "gpu_memory_utilization", "attention_backend",
            "enable_prefix_caching", "enforce_eager"]
    kwargs = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    if args.enable_lora:
        kwargs.update(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                      max_cpu_loras=args.max_cpu_loras, allowed_lora_root=args.allowed_lora_root)
    return kwargs


def _check_args(args: argparse.Namespace) -> None:
    if args.tensor_parallel_size != 1:
        raise StartupError(f"--tensor-parallel-size {args.tensor_parallel_size}: only 1 is supported "
                           "(serve larger models with one GPU per replica)")
    for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "num_kv_blocks", "max_model_len",
                 "max_loras", "max_lora_rank", "max_n"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise StartupError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise StartupError("--max-queued-requests must be >= 0")
    if not 0 <= args.lora_unload_timeout < float("inf"):
        raise StartupError("--lora-unload-timeout must be a finite number >= 0")
    if args.shutdown_timeout < 0:
        raise StartupError("--shutdown-timeout must be >= 0")
    if args.allowed_lora_root is not None and not os.path.isdir(args.allowed_lora_root):
        raise StartupError(f"--allowed-lora-root {args.allowed_lora_root}: no such directory")


def _server_config(args: argparse.Namespace, api_keys: list[str]):
    from pageant.engine.server.adapters_config import parse_lora_modules
    from pageant.engine.server.app import ServerConfig

    return ServerConfig(
        served_model_names=args.served_model_name or [], api_keys=api_keys,
        max_queued_requests=args.max_queued_requests, shutdown_timeout=args.shutdown_timeout,
        max_log_len=args.max_log_len, log_requests=not args.disable_log_requests,
        max_body_bytes=args.max_request_body_bytes, max_n=args.max_n,
        engine_stall_timeout=args.engine_stall_timeout, lora_modules=parse_lora_modules(args.lora_modules),
        lora_modules_file=args.lora_modules_file, allowed_lora_root=args.allowed_lora_root,
        max_loras=args.max_loras if args.enable_lora else 0, lora_unload_timeout=args.lora_unload_timeout,
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_keys = args.api_key or ([os.environ["PAGEANT_API_KEY"]] if os.environ.get("PAGEANT_API_KEY") else [])
    try:
        _check_args(args)
        config = _server_config(args, api_keys)
        from pageant.engine.server.adapters_config import validate_specs, read_adapters_file, engine_supports_lora

        if args.lora_modules_file:  # a bad file is a startup error; later bad edits are only logged
            read_adapters_file(args.lora_modules_file)
        model_dir, default_name = resolve_model(args.model, revision=args.revision, download_dir=args.download_dir)
        names = config.served_model_names or [default_name]
        config.served_model_names = names
        validate_specs(config.lora_modules, allowed_root=args.allowed_lora_root, base_names=names)
        args.device, args.dtype = resolve_device_dtype(args.device, args.dtype, model_dir)
    except (StartupError, ValueError, FileNotFoundError) as exc:
        print(f"pageant serve: error: {exc}", file=sys.stderr)
        return 2

    try:
        engine = _build_engine(model_dir, engine_kwargs(args))
    except Exception as exc:  # noqa: BLE001 - a model that cannot load is one clear line, not a traceback
        logger.debug("engine start failed", exc_info=True)
        print(f"pageant serve: error: could not start the engine for {model_dir}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2

    from pageant.engine.server.adapters_config import AdapterConfigError
    from pageant.engine.server.app import build_app

    app = build_app(engine, config)
    try:
        app.state.adapters.load_at_startup()
    except (AdapterConfigError, OSError) as exc:
        print(f"pageant serve: error: {exc}", file=sys.stderr)
        return 2
    if args.enable_lora and not engine_supports_lora(engine):
        logger.warning("--enable-lora: this engine cannot load adapters; serving the base model only")
    return serve_app(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                     shutdown_timeout=args.shutdown_timeout)


def serve_app(app, *, host: str, port: int, log_level: str, shutdown_timeout: float) -> int:
    import uvicorn

    from pageant.engine.server.app import drain

    class DrainingServer(uvicorn.Server):
        """uvicorn, except that SIGTERM/SIGINT drain first (see the module docstring)."""

        draining = False
        loop: asyncio.AbstractEventLoop | None = None

        async def startup(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().startup(sockets)

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

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            access_log=log_level in ("debug", "trace"))
    server = DrainingServer(config)
    server.run()
    return 0 if server.started else 1
