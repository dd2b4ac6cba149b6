"""The OpenAI-compatible HTTP server (`pageant serve`).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events), ``GET /v1/models`` (the base model and every loaded LoRA adapter),
``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (runtime LoRA adapters, with
--enable-lora), ``POST /tokenize``, ``POST /detokenize``, ``GET /version``, ``GET /health`` (the engine loop is alive
and making progress), ``GET /ready`` (model loaded, not draining), ``GET /metrics`` (Prometheus, vLLM's
metric names). Errors always have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.

Modules, one job each: ``cli`` (flags, model resolution, uvicorn with draining on SIGTERM), ``app``
(the app factory ``build_app(engine, ServerConfig)``), ``serving`` (completions and chat handlers),
``async_engine`` (the thread that owns the ``LLMEngine``), ``protocol`` (request/response models),
``validation`` (checks and ``APIError``), ``tokens`` (the server's tokenizer copy), ``formatting``
(logprobs), ``metrics``, ``middleware`` (API keys, body size), ``adapters_config`` (the configured
adapter lists), ``adapters_watch`` (live LoRA adapters: the watched file and the HTTP endpoints).
"""
