"""The FastAPI app factory: ``build_app(engine, config)`` wires the engine thread, handlers and metrics.

The app can run in-process (tests build it around a real ``LLMEngine`` or a subclass) or under
``pageant serve``. Every error reply has OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from pageant import __version__
from pageant.engine.server import protocol as p
from pageant.engine.server.protocol_embeddings import EmbeddingRequest, EmbeddingResponse
from pageant.engine.server.serving_embeddings import embeddings
from pageant.engine.server.adapters_config import AdapterSpec
from pageant.engine.server.adapters_watch import AdapterManager
from pageant.engine.sampling_params import StopLimits
from pageant.engine.server.async_engine import AsyncEngine, EngineDeadError
from pageant.engine.server.http_limits import (DEFAULT_HEADER_TIMEOUT, DEFAULT_MAX_HEADER_BYTES,
                                               DEFAULT_MAX_HEADER_COUNT, HeaderLimitMiddleware)
from pageant.engine.server.metrics import CONTENT_TYPE, ServerMetrics
from pageant.engine.server.middleware import GuardMiddleware
from pageant.engine.server.serving import OpenAIServing
from pageant.engine.server.tokens import ServerTokenizer
from pageant.engine.server.validation import APIError, Limits, check_prompt_ids

logger = logging.getLogger("pageant.server")

_field_names: set[str] = set()
for _model in (p.CompletionRequest, p.ChatCompletionRequest, p.TokenizeRequest, p.DetokenizeRequest, p.ChatMessage,
               p.TextContentPart, p.StreamOptions, p.ResponseFormat, p.LoadLoRAAdapterRequest,
               p.UnloadLoRAAdapterRequest):
    _field_names.update(_model.model_fields)

_FAILURE_REASONS = {400: "bad_request", 401: "unauthorized", 404: "not_found", 409: "conflict", 413: "too_large",
                    414: "too_large", 422: "bad_request", 429: "queue_full", 431: "too_large", 500: "server_error",
                    503: "unavailable"}


@dataclass
class ServerConfig:
    """Server-side settings (the engine's own settings live in its ``EngineConfig``)."""

    served_model_names: list[str] = field(default_factory=list)  # empty: the engine's model_name
    api_keys: list[str] = field(default_factory=list)
    max_queued_requests: int | None = None
    shutdown_timeout: float = 30.0
    max_log_len: int | None = None
    log_requests: bool = True
    max_body_bytes: int = 4 * 1024 * 1024
    max_n: int = 16
    max_logprobs: int = 20
    engine_stall_timeout: float = 120.0
    lora_modules: list[AdapterSpec] = field(default_factory=list)
    lora_modules_file: str | None = None
    allowed_lora_root: str | None = None
    max_loras: int = 0
    adapters_poll_interval: float = 2.0
    lora_unload_timeout: float = 30.0  # how long an HTTP unload waits for the adapter's requests (then 409)
    # header fields beyond these get 431 (--h11-max-incomplete-event-size, --h11-max-header-count)
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    max_header_count: int = DEFAULT_MAX_HEADER_COUNT
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # seconds a request header may take (--request-header-timeout)
    # caps on a request's stop conditions (--max-stop-strings, --max-stop-chars, --max-stop-token-ids)
    stop_limits: StopLimits = field(default_factory=StopLimits)
    # chat: tool calls parsed from the text (tool_choice "auto") and reasoning split from the answer
    tool_call_parser: str | None = None  # --tool-call-parser
    enable_auto_tool_choice: bool = False  # --enable-auto-tool-choice
    reasoning_parser: str | None = None  # --reasoning-parser


def _errors_route_responses() -> dict:
    err = {"model": p.ErrorResponse}
    return {400: err, 401: err, 404: err, 413: err, 422: err, 429: err, 500: err, 503: err}


def _generation_responses() -> dict:
    responses = _errors_route_responses()
    # With `"stream": true`: server-sent events, each `data:` a JSON chunk (then `data: [DONE]`).
    event = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
             "required": ["data"]}
    responses[200] = {"content": {"text/event-stream": {"schema": event}}}
    return responses


def build_app(engine, config: ServerConfig | None = None) -> FastAPI:
    """An app serving ``engine`` (an ``LLMEngine``; the app's engine thread owns it from startup on)."""
    config = config or ServerConfig()
    names = list(config.served_model_names) or [engine.model_name]
    async_engine = AsyncEngine(engine, None, max_queued_requests=config.max_queued_requests,
                               stall_timeout=config.engine_stall_timeout)
    adapters = AdapterManager(async_engine, static=config.lora_modules, file=config.lora_modules_file,
                              allowed_root=config.allowed_lora_root, base_names=names, max_loras=config.max_loras,
                              poll_interval=config.adapters_poll_interval, unload_timeout=config.lora_unload_timeout)

    def lora_info() -> dict:
        stats = async_engine.stats()
        return {"max_lora": stats.get("max_lora", config.max_loras), "running": stats.get("running_lora_adapters", ()),
                "waiting": stats.get("waiting_lora_adapters", ())}

    ecfg = engine.config
    cache_config = {"block_size": str(getattr(ecfg, "block_size", "")), "num_gpu_blocks": str(getattr(ecfg, "num_kv_blocks", "")),
                    "enable_prefix_caching": str(bool(getattr(ecfg, "enable_prefix_caching", False))),
                    "cache_dtype": str(getattr(ecfg, "kv_cache_dtype", "auto"))}
    metrics = ServerMetrics(names[0], async_engine.stats, lora_info, cache_config)
    async_engine.metrics = metrics
    max_model_len = int(engine.config.max_model_len)
    tokenizer = ServerTokenizer.from_engine(engine)
    vocab_size = int(getattr(engine, "vocab_size", 0) or 0) or tokenizer.vocab_size
    limits = Limits(max_model_len=max_model_len, vocab_size=vocab_size,
                    max_n=config.max_n, max_logprobs=config.max_logprobs, stop=config.stop_limits)
    serving = OpenAIServing(async_engine, tokenizer, limits, model_names=names, metrics=metrics,
                            max_log_len=config.max_log_len, log_requests=config.log_requests, adapters=adapters)
    serving.runner = getattr(ecfg, "runner", "generate")
    serving.tool_call_parser, serving.reasoning_parser = config.tool_call_parser, config.reasoning_parser
    serving.enable_auto_tool_choice = config.enable_auto_tool_choice
    if serving.runner == "generate" and hasattr(engine, "structured_outputs"):
        engine.structured_outputs  # noqa: B018 - made now, before the engine thread and the server share it
    serving.eos_token_ids = frozenset(getattr(engine.tokenizer, "eos_token_ids", ()))  # beam search ends hypotheses there

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async_engine.start()
        watcher = asyncio.create_task(adapters.watch()) if config.lora_modules_file or config.lora_modules else None
        try:
            yield
        finally:
            if watcher is not None:
                watcher.cancel()
            await asyncio.to_thread(async_engine.stop)
            tokenizer.close()

    app = FastAPI(title="Pageant", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible API of the Pageant inference engine.")
    app.state.async_engine = async_engine
    app.state.serving = serving
    app.state.metrics = metrics
    app.state.adapters = adapters
    app.state.config = config
    app.add_middleware(GuardMiddleware, api_keys=list(config.api_keys), max_body_bytes=config.max_body_bytes,
                       on_reject=lambda status: metrics.failure(_FAILURE_REASONS.get(status, str(status))))
    app.add_middleware(HeaderLimitMiddleware, max_header_bytes=config.max_header_bytes,  # outermost: first
                       max_header_count=config.max_header_count,
                       on_reject=lambda status: metrics.failure(_FAILURE_REASONS.get(status, str(status))))

    # ------------------------------------------------------------------ errors
    def error_response(err: APIError) -> JSONResponse:
        metrics.failure(_FAILURE_REASONS.get(err.status, str(err.status)))
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(APIError(400, "The request body is not valid JSON."))
        messages: dict[str, str] = {}
        for e in errors:
            loc = [x for x in e.get("loc", ()) if x != "body"]
            # union members show up as extra loc parts (e.g. "temperature.float"): keep the field path
            path = ".".join(str(x) for x in loc if isinstance(x, int) or x in _field_names) or ".".join(map(str, loc[:1]))
            messages.setdefault(str(loc[0]) if loc else "body", f"{path or 'body'}: {e.get('msg')}")
        param = next(iter(messages), None)
        return error_response(APIError(422, "; ".join(list(messages.values())[:5]) or "invalid request",
                                       param=None if param == "body" else param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {exc!r}"))

    # ------------------------------------------------------------------ probes and metrics
    @app.get("/health", response_model=p.HealthResponse, responses={503: {"model": p.HealthResponse}})
    async def health():
        ok, why = async_engine.health()
        return JSONResponse(p.HealthResponse(status="ok" if ok else "unhealthy", detail=None if ok else why).model_dump(),
                            status_code=200 if ok else 503)

    @app.get("/ready", response_model=p.HealthResponse, responses={503: {"model": p.HealthResponse}})
    async def ready():
        ok, why = async_engine.health()
        if serving.draining:
            ok, why = False, "draining: the server is shutting down"
        return JSONResponse(p.HealthResponse(status="ready" if ok else "not ready", detail=None if ok else why).model_dump(),
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/version", response_model=p.VersionResponse, responses=_errors_route_responses())
    async def version():
        return p.VersionResponse(version=__version__)

    # ------------------------------------------------------------------ OpenAI API
    @app.get("/v1/models", response_model=p.ModelList, responses=_errors_route_responses())
    async def list_models():
        cards = [p.ModelCard(id=name, root=name, max_model_len=max_model_len) for name in names]
        cards += [p.ModelCard(id=name, root=adapters.paths.get(name, req.lora_path), parent=names[0],
                              max_model_len=max_model_len) for name, req in adapters.loaded.items()]
        return p.ModelList(data=cards)

    @app.post("/v1/completions", response_model=p.CompletionResponse, responses=_generation_responses())
    async def completions(body: p.CompletionRequest, raw: Request):
        return await serving.completions(body, raw)

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse, responses=_generation_responses())
    async def chat_completions(body: p.ChatCompletionRequest, raw: Request):
        return await serving.chat(body, raw)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=_errors_route_responses())
    async def create_embeddings(body: EmbeddingRequest, raw: Request):
        return await embeddings(serving, body, raw)

    @app.post("/reset_prefix_cache", status_code=200, responses=_errors_route_responses())
    async def reset_prefix_cache():
        """Drop every prefix-cache entry (vLLM's endpoint; benchmarks call it between runs)."""
        if not callable(getattr(engine, "reset_prefix_cache", None)):
            raise APIError(404, "this engine has no prefix cache", code="not_supported")
        await async_engine.call(lambda e: e.reset_prefix_cache())
        return JSONResponse({"status": "ok"})

    def _adapter_responses() -> dict:
        responses = _errors_route_responses()
        responses[409] = {"model": p.ErrorResponse}
        responses[200] = {"content": {"text/plain": {"schema": {"type": "string"}}}}
        return responses

    @app.post("/v1/load_lora_adapter", responses=_adapter_responses())
    async def load_lora_adapter(body: p.LoadLoRAAdapterRequest):
        """Load a LoRA adapter at run time (vLLM's endpoint; needs --enable-lora). It is then a model
        in the API and in /v1/models. A bad adapter is a 400 and loads nothing."""
        try:
            await adapters.load(body.lora_name, body.lora_path)
        except EngineDeadError as exc:
            raise APIError(503, f"The engine is not running: {exc}", code="engine_dead") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter", responses=_adapter_responses())
    async def unload_lora_adapter(body: p.UnloadLoRAAdapterRequest):
        """Unload an adapter (loaded over HTTP or from --lora-modules-file): unroutable at once; unloaded
        when its unfinished requests end, or 409 (and served again) if they have not ended within
        --lora-unload-timeout seconds. Adapters from --lora-modules are refused (400)."""
        try:
            await adapters.unload(body.lora_name)
        except EngineDeadError as exc:
            raise APIError(503, f"The engine is not running: {exc}", code="engine_dead") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/tokenize", response_model=p.TokenizeResponse, responses=_errors_route_responses())
    async def tokenize(body: p.TokenizeRequest):
        serving.resolve_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of `prompt` or `messages`", param="prompt")
        if body.messages is not None:
            if not body.messages:
                raise APIError(400, "messages must not be empty", param="messages")
            if any(isinstance(m.content, list) and any(c.type == "image_url" for c in m.content) for m in body.messages):
                raise APIError(400, "/tokenize does not take image_url content parts (an image's token count comes "
                                    "from the model's processor); send text only", param="messages")
            ids = await tokenizer.achat_ids(body.messages, body.add_generation_prompt)
        else:
            ids = await tokenizer.aencode(body.prompt, add_special_tokens=body.add_special_tokens)
        # a long prompt's reply (p.TokenizeResponse) is megabytes of JSON: build it off the event loop, in
        # pieces, so that the GIL passes back to the loop between them
        def reply() -> str:
            parts = [",".join(map(str, ids[i : i + 8192])) for i in range(0, len(ids), 8192)]
            return f'{{"count":{len(ids)},"max_model_len":{max_model_len},"tokens":[{",".join(parts)}]}}'

        return Response(await tokenizer.run(reply), media_type="application/json")

    @app.post("/detokenize", response_model=p.DetokenizeResponse, responses=_errors_route_responses())
    async def detokenize(body: p.DetokenizeRequest):
        serving.resolve_model(body.model)
        if body.tokens:
            check_prompt_ids(body.tokens, limits, param="tokens")
        return p.DetokenizeResponse(prompt=await tokenizer.adecode(body.tokens))

    return app


async def drain(app: FastAPI, timeout: float) -> None:
    """Stop taking requests (``/ready`` and new requests answer 503), let in-flight ones finish for up
    to ``timeout`` seconds, then fail whatever is left with a 503 error."""
    serving: OpenAIServing = app.state.serving
    async_engine: AsyncEngine = app.state.async_engine
    serving.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while async_engine.num_inflight > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if async_engine.num_inflight > 0:
        logger.warning("shutdown timeout: failing %d in-flight request(s)", async_engine.num_inflight)
        async_engine.fail_all("The server shut down before the request finished.", status=503)
        end = loop.time() + 2.0
        while async_engine.num_inflight > 0 and loop.time() < end:
            await asyncio.sleep(0.05)
