"""``pageant serve``'s flags: the parser, and the engine's keyword arguments made from them.

Kept apart from ``cli.py`` (startup, model resolution, uvicorn) so the flag table stays readable.
"""

from __future__ import annotations

import argparse
import json

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
    e.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "fp8_e4m3"], default=None,
                   help="KV-cache element type: auto (the model dtype) or fp8 / fp8_e4m3 (float8 e4m3 with the "
                        "checkpoint's per-layer k/v scales, else 1.0: twice the bf16 blocks in the same memory) "
                        "(None: auto)")
    e.add_argument("--attention-backend", choices=["torch", "triton"], default=None,
                   help="attention kernels (None: triton on GPU, torch on CPU: the C++ paged attention, built on first "
                        "use with the system compiler, else the PyTorch reference)")
    e.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=None,
                   help="reuse the KV cache of prompt prefixes shared with earlier requests (None: off)")
    e.add_argument("--enforce-eager", action="store_true", default=None,
                   help="never capture CUDA graphs: decode runs eagerly, as prefill always does (None: off)")
    d = ap.add_argument_group("parallelism (one worker process per rank; gloo on CPU, NCCL on GPU)")
    d.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split every layer over this many ranks (GPUs) (default 1)")
    d.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="split the layers into this many stages, each on tensor-parallel-size ranks (default 1)")
    d.add_argument("--nnodes", type=int, default=None, help="nodes the ranks are spread over (None: 1)")
    d.add_argument("--node-rank", type=int, default=None,
                   help="this node's index; node 0 serves HTTP, the others run with --headless (None: 0)")
    d.add_argument("--master-addr", default=None,
                   help="node 0's address for the rendezvous (None: $MASTER_ADDR, else 127.0.0.1 on one node)")
    d.add_argument("--master-port", type=int, default=None,
                   help="the rendezvous port on node 0 (None: $MASTER_PORT, else a free port on one node)")
    d.add_argument("--headless", action="store_true",
                   help="run only this node's ranks (no HTTP server); exits non-zero when the group fails")
    d.add_argument("--distributed-timeout-seconds", type=float, default=None,
                   help="a collective waiting longer than this fails the engine (a hung rank) (None: 120)")
    e.add_argument("--load-format", choices=["auto", "dummy"], default=None,
                   help="auto: the checkpoint's safetensors; dummy: random weights made on the device from "
                        "config.json (benchmarks of large shapes) (None: auto)")
    e.add_argument("--quantization", "-q", choices=["compressed-tensors", "gptq", "awq", "fp8"], default=None,
                   help="weights' quantization: compressed-tensors, gptq or awq checkpoints (also detected from "
                        "config.json), or fp8 (online, per channel, of a float checkpoint) (None: from the checkpoint)")
    r = ap.add_argument_group("runner, embeddings and structured outputs")
    r.add_argument("--runner", choices=["generate", "pooling"], default=None,
                   help="generate: text generation; pooling: embeddings through /v1/embeddings (None: generate)")
    r.add_argument("--task", choices=["generate", "embed"], default=None,
                   help="older spelling of --runner: embed is --runner pooling")
    r.add_argument("--pooler-config", default=None, metavar="JSON",
                   help='override the checkpoint\'s pooling, e.g. \'{"pooling_type": "MEAN", "normalize": true}\' '
                        "(pooling_type LAST, MEAN or CLS; None: the sentence-transformers files, else LAST + "
                        "normalize)")
    r.add_argument("--structured-outputs-config", default=None, metavar="JSON",
                   help='structured outputs, e.g. \'{"backend": "auto", "disable_any_whitespace": false}\' '
                        "(backend auto, xgrammar or guidance; None: auto)")
    r.add_argument("--limit-mm-per-prompt", default=None, metavar="JSON",
                   help='vision-language models: most images per prompt, e.g. \'{"image": 4}\' (None: 16)')
    r.add_argument("--allowed-media-domains", nargs="+", default=None, metavar="HOST",
                   help="hosts whose http(s) image URLs the server fetches (None: only data: URLs are accepted)")
    r.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s keys, e.g. \'{"method": "ngram", "num_speculative_tokens": 3, '
                        '"prompt_lookup_max": 4}\' or \'{"model": "path/to/draft", "num_speculative_tokens": 3}\' '
                        "(also prompt_lookup_min, disable_by_batch_size; None: off)")
    r.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='parse tool calls out of the model\'s text when tool_choice is "auto" (needs --tool-call-parser)')
    r.add_argument("--tool-call-parser", choices=["hermes", "llama3_json", "mistral", "pythonic"], default=None,
                   help="the model's tool-call format: hermes (Qwen2.5, Hermes), llama3_json (Llama 3.1/3.2), "
                        "mistral, pythonic (Llama 3.2/4)")
    r.add_argument("--reasoning-parser", choices=["deepseek_r1", "qwen3"], default=None,
                   help="split <think>...</think> into reasoning_content; structured outputs then constrain only "
                        "the answer after it")
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


def engine_kwargs(args: argparse.Namespace, model_dir: str | None = None) -> dict:
    """The engine's keyword arguments: only the flags that were given (the engine has the defaults).

    With ``--no-enable-chunked-prefill`` the step token budget is raised to at least the context
    length (``--max-model-len``, else the checkpoint's in ``model_dir``), so no prompt is ever split."""
    keys = ["tokenizer", "dtype", "device", "seed", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
            "block_size", "num_kv_blocks", "kv_cache_memory_gib", "gpu_memory_utilization", "kv_cache_dtype", "attention_backend",
            "enable_prefix_caching", "enforce_eager", "quantization", "load_format", "tensor_parallel_size",
            "pipeline_parallel_size", "nnodes", "node_rank", "master_addr", "master_port",
            "distributed_timeout_seconds"]
    kwargs = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    runner = args.runner or {"embed": "pooling", "generate": "generate", None: None}[args.task]
    if args.runner and args.task and runner != {"embed": "pooling", "generate": "generate"}[args.task]:
        raise StartupError(f"--runner {args.runner} and --task {args.task} disagree")
    if runner:
        kwargs["runner"] = runner
    if args.pooler_config is not None:
        kwargs["pooler_config"] = _json_flag("--pooler-config", args.pooler_config)
    structured = _json_flag("--structured-outputs-config", args.structured_outputs_config) or {}
    if args.reasoning_parser:
        structured["reasoning_parser"] = args.reasoning_parser
    if structured:
        kwargs["structured_outputs_config"] = structured
    if getattr(args, "limit_mm_per_prompt", None) is not None:
        kwargs["limit_mm_per_prompt"] = _json_flag("--limit-mm-per-prompt", args.limit_mm_per_prompt)
    if getattr(args, "speculative_config", None) is not None:
        kwargs["speculative_config"] = _json_flag("--speculative-config", args.speculative_config)
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


def _json_flag(flag: str, value: str | None) -> dict | None:
    """A flag whose value is a JSON object (StartupError otherwise)."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError as exc:
        raise StartupError(f"{flag} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise StartupError(f"{flag} must be a JSON object")
    return parsed


