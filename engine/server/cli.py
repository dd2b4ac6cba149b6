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

logger = logging.getLogger("pageant.server")


class StartupError(Exception):
    """A configuration problem reported as one clear line before exiting with status 2."""


DESCRIPTION = """\
Load a model (a checkpoint directory, a Hugging Face Hub id, or the bundled demo model) and serve the
OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models, ...) over HTTP.
Flag names follow "vllm serve" where vLLM has the same setting.

SIGTERM (and the first Ctrl-C) drain the server: /ready turns 503 at once, new requests get 503,
in-flight requests get up to --shutdown-timeout seconds to finish, then the process exits 0.

examples:
  pageant serve                                   (the bundled demo model)
  pageant serve Qwen/Qwen2.5-0.5B-Instruct --dtype bfloat16 --enable-prefix-caching
  pageant serve /models/llama --api-key $KEY --chat-template ./chat.jinja
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default after its help; the description's line breaks as written."""


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pageant serve", usage="%(prog)s [MODEL] [options]", description=DESCRIPTION,
                                 formatter_class=_HelpFormatter, allow_abbrev=False)
    m = ap.add_argument_group("model")
    m.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="checkpoint directory or Hugging Face Hub id, as in 'vllm serve MODEL' (same as --model; "
                        "with neither, the bundled demo model is served)")
    m.add_argument("--model", default=None,
                   help="checkpoint directory or Hugging Face Hub id (an alternative to the positional MODEL)")
    m.add_argument("--tokenizer", default=None,
                   help="tokenizer directory or Hugging Face Hub id (None: the model's own tokenizer)")
    m.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in the request's 'model' field (None: the model's directory "
                        "name or Hub id)")
    m.add_argument("--revision", default=None, help="Hub revision: a branch, tag or commit (None: main)")
    m.add_argument("--download-dir", default=None, help="Hub cache directory (None: huggingface_hub's default)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16", "half", "float"],
                   help="weight and activation dtype; auto: float32 on CPU, on GPU the checkpoint's "
                        "float16/bfloat16, else bfloat16")
    m.add_argument("--device", default=None, help="cpu or cuda[:N] (None: cuda when available)")
    m.add_argument("--seed", type=int, default=None,
                   help="seed of the engine's sampling generator (None: the engine's default, 0)")
    m.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM compatibility and ignored: Pageant runs its own implementation of "
                        "each supported architecture and never executes code shipped with a checkpoint")
    m.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, as a file path or inline text, used by /v1/chat/completions "
                        "and /tokenize instead of the tokenizer's own (None: the tokenizer's)")
    m.add_argument("--generation-config", default="auto", metavar="{auto,vllm,FOLDER}",
                   help="default sampling parameters for requests that leave them unset (temperature, top_p, "
                        "top_k, min_p, repetition_penalty) from a generation_config.json; auto: the "
                        "checkpoint's, vllm: none (the built-in defaults), FOLDER: the one in that folder. "
                        "Its max_new_tokens caps max_tokens for every request")
    e = ap.add_argument_group("engine")
    e.add_argument("--max-model-len", type=int, default=None,
                   help="longest sequence (prompt plus completion) in tokens (None: the model's "
                        "max_position_embeddings)")
    e.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences in one engine step (None: the engine's default, 64)")
    e.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one engine step; longer prompts are prefilled in chunks (None: the "
                        "engine's default, 2048)")
    e.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                   help="prefill prompts longer than --max-num-batched-tokens in chunks (the engine always "
                        "can); --no-enable-chunked-prefill raises --max-num-batched-tokens to at least "
                        "--max-model-len, as vLLM does, so no prompt is ever split")
    e.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV-cache block (None: the engine's default, 16)")
    e.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV pool size in blocks (overrides the memory-based sizing)")
    e.add_argument("--kv-cache-memory-gib", type=float, default=None,
                   help="KV pool size in GiB on CPU (None: the engine's default, 1)")
    e.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="fraction of GPU memory for weights, activations and the KV pool (None: the "
                        "engine's default, 0.9)")
    e.add_argument("--attention-backend", choices=["torch", "triton"], default=None,
                   help="attention kernels (None: triton on GPU, torch on CPU)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV cache of prompt prefixes shared with earlier requests (None: off)")
    e.add_argument("--enforce-eager", action="store_true", default=None,
                   help="never capture CUDA graphs: decode runs eagerly, as prefill always does (None: off)")
    e.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="only 1 is supported")
    lora = ap.add_argument_group("LoRA adapters")
    lora.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters on top of the base model")
    lora.add_argument("--max-loras", type=int, default=1, help="most adapters in one batch (and on the device)")
    lora.add_argument("--max-lora-rank", type=int, default=16, help="largest adapter rank accepted")
    lora.add_argument("--max-cpu-loras", type=int, default=None,
                      help="validated adapters cached in host memory (None: --max-loras)")
    lora.add_argument("--lora-modules", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                      help="adapters served from startup on, each as NAME=PATH (repeatable)")
    lora.add_argument("--lora-modules-file", default=None,
                      help='JSON file {"adapters": [{"name": ..., "path": ...}]}, re-read when it changes')
    lora.add_argument("--allowed-lora-root", default=None, help="adapter paths must be under this directory")
    lora.add_argument("--lora-unload-timeout", type=float, default=30.0,
                      help="seconds POST /v1/unload_lora_adapter waits for the adapter's requests to end "
                           "before refusing with 409")
    s = ap.add_argument_group("server")
    s.add_argument("--host", default="0.0.0.0", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (checked before the model loads)")
    s.add_argument("--api-key", action="append", default=None,
                   help="required bearer token (repeatable; None: the PAGEANT_API_KEY environment variable, "
                        "else no key is required)")
    s.add_argument("--max-queued-requests", type=int, default=None,
                   help="waiting requests beyond which new ones get 429 (None: unlimited)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM")
    s.add_argument("--max-request-body-bytes", type=int, default=4 * 1024 * 1024,
                   help="larger request bodies get 413")
    s.add_argument("--max-n", type=int, default=16, help="largest 'n' a request may ask for")
    s.add_argument("--h11-max-incomplete-event-size", type=int, default=16 * 1024,
                   help="most bytes of request header fields (and of an incomplete header block): more get 431")
    s.add_argument("--h11-max-header-count", type=int, default=100,
                   help="most header fields in a request: more get 431")
    s.add_argument("--request-header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send a complete request header before it is "
                        "closed (0: no limit)")
    s.add_argument("--max-stop-strings", type=int, default=64, help="most stop strings in a request (more: 400)")
    s.add_argument("--max-stop-chars", type=int, default=4096,
                   help="most characters of all a request's stop strings together (more: 400)")
    s.add_argument("--max-stop-token-ids", type=int, default=256, help="most stop_token_ids in a request (more: 400)")
    s.add_argument("--engine-stall-timeout", type=float, default=120.0,
                   help="/health turns 503 when the engine loop makes no progress for this many seconds")
    s.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (debug and trace also log every HTTP request)")
    s.add_argument("--enable-log-requests", action="store_true",
                   help="log each request (id, prompt length, sampling parameters, LoRA adapter, prompt)")
    s.add_argument("--max-log-len", type=int, default=None,
                   help="with --enable-log-requests, log at most this many prompt characters or token ids "
                        "(None: all)")
    s.add_argument("--disable-log-requests", action="store_true",
                   help="deprecated (as in vLLM): requests are logged only with --enable-log-requests")
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


def model_argument(args: argparse.Namespace) -> str | None:
    """The model from the positional MODEL or ``--model`` (the same value may be given both ways)."""
    if args.model_tag is not None and args.model is not None and args.model_tag != args.model:
        raise StartupError(f"the positional MODEL ({args.model_tag!r}) and --model ({args.model!r}) differ: "
                           "give the model once")
    return args.model_tag if args.model_tag is not None else args.model


def engine_kwargs(args: argparse.Namespace, model_dir: str | None = None) -> dict:
    """The engine's keyword arguments: only the flags that were given (the engine has the defaults).

    With ``--no-enable-chunked-prefill`` the step token budget is raised to at least the context
    length (``--max-model-len``, else the checkpoint's in ``model_dir``), so no prompt is ever split."""
    keys = ["tokenizer", "dtype", "device", "seed", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
            "block_size", "num_kv_blocks", "kv_cache_memory_gib", "gpu_memory_utilization", "attention_backend",
            "enable_prefix_caching", "enforce_eager"]
    kwargs = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if args.enable_lora:
        kwargs.update(enable_lora=True, max_loras=args.max_loras, max_lora_rank=args.max_lora_rank,
                      max_cpu_loras=args.max_cpu_loras, allowed_lora_root=args.allowed_lora_root)
    if args.enable_chunked_prefill is False:
        from pageant.engine.config import EngineConfig, ModelConfig, resolve_max_model_len

        max_len = args.max_model_len
        if model_dir is not None:
            try:
                max_len = resolve_max_model_len(args.max_model_len, ModelConfig.from_pretrained(model_dir))
            except (OSError, KeyError) as exc:
                raise StartupError(f"--no-enable-chunked-prefill: cannot read the context length of {model_dir}: "
                                   f"{exc}") from None
        budget = args.max_num_batched_tokens
        if budget is not None and max_len is not None and budget < max_len:
            raise StartupError(f"--max-num-batched-tokens ({budget}) is smaller than --max-model-len ({max_len}): "
                               "with --no-enable-chunked-prefill longer prompts could never run; raise it or "
                               "lower --max-model-len")
        if budget is None and max_len is not None:
            default = EngineConfig.__dataclass_fields__["max_num_batched_tokens"].default
            kwargs["max_num_batched_tokens"] = max(default, max_len)
    return kwargs


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
    sock: socket.socket | None = None
    try:
        try:
            sock = reserve_port(args.host, args.port)  # first: a busy port must not wait for the model load
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
        return serve_app(app, host=args.host, port=args.port, log_level=args.uvicorn_log_level,
                         shutdown_timeout=args.shutdown_timeout, sock=sock)
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
    return 0 if server.started else 1
