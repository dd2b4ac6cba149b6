"""Structured outputs over HTTP: a request's constraint from OpenAI's ``response_format``, vLLM's
``structured_outputs`` object or the older ``guided_*`` fields (aliases: accepted, never ignored),
compiled and checked before the request enters the engine.

At most one source may be given (``response_format: text`` counts as none). A constraint that is
invalid, or does not compile within ``COMPILE_TIMEOUT`` seconds, is a 400 carrying the backend's
message; compilation runs on the manager's own thread, off the event loop.
"""

from __future__ import annotations

import asyncio

from pageant.engine.structured_outputs import StructuredOutputsParams
from pageant.engine.server.validation import APIError

COMPILE_TIMEOUT = 10.0
_KEYS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag", "disable_any_whitespace")


def constraint(body) -> StructuredOutputsParams | None:
    """The request's constraint, or None (a 400 for conflicting or malformed ones)."""
    sources: list[tuple[str, dict]] = []
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.type != "text":
        if fmt.type == "json_object":
            sources.append(("response_format", {"json_object": True}))
        else:
            schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
            if schema is None:
                raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
            sources.append(("response_format", {"json": schema}))
    if body.structured_outputs is not None:
        unknown = sorted(set(body.structured_outputs) - set(_KEYS))
        if unknown:
            raise APIError(400, f"unknown structured_outputs keys {unknown}; supported: {list(_KEYS)}",
                           param="structured_outputs")
        sources.append(("structured_outputs", dict(body.structured_outputs)))
    guided = {"json": body.guided_json, "regex": body.guided_regex, "choice": body.guided_choice,
              "grammar": body.guided_grammar}
    for key, value in guided.items():
        if value is not None:
            sources.append((f"guided_{key}", {key: value}))
    if body.guided_whitespace_pattern is not None:
        raise APIError(400, "guided_whitespace_pattern is not supported; use structured_outputs "
                            "disable_any_whitespace", param="guided_whitespace_pattern")
    if not sources:
        if body.guided_decoding_backend is not None:
            raise APIError(400, "guided_decoding_backend needs a guided_* constraint", param="guided_decoding_backend")
        return None
    if len(sources) > 1:
        raise APIError(400, f"give one structured-output constraint, got {[name for name, _ in sources]}",
                       param=sources[1][0])
    name, fields = sources[0]
    try:
        return StructuredOutputsParams(**fields)
    except (TypeError, ValueError) as exc:
        raise APIError(400, str(exc), param=name) from None


async def validate(engine, params: StructuredOutputsParams, backend: str | None = None) -> None:
    """Compile ``params`` now (or find it in the cache); a 400 with the backend's message if it fails.
    ``backend``: a request's ``guided_decoding_backend``, which must be the server's."""
    manager = engine.structured_outputs
    if backend is not None and backend not in ("auto", manager.backend_name(params)):
        raise APIError(400, f"this server's structured-outputs backend is {manager.backend_name(params)}, "
                            f"not {backend}", param="guided_decoding_backend")
    try:
        await asyncio.get_running_loop().run_in_executor(None, manager.validate, params, COMPILE_TIMEOUT)
    except ValueError as exc:
        raise APIError(400, str(exc), param=params.kind) from None
