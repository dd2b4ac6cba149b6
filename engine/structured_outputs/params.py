"""``StructuredOutputsParams``: which constraint a request's output must follow (vLLM's fields)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
MAX_SPEC_CHARS = 256 * 1024  # a constraint's source text (schema, regex, grammar) at most
MAX_CHOICES = 1024


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of ``json`` (a JSON Schema, as a dict or a JSON string), ``json_object``
    (any JSON object), ``regex``, ``choice`` (a list of strings), ``grammar`` (EBNF, or Lark for the
    guidance backend) or ``structural_tag`` (xgrammar's JSON format). ``disable_any_whitespace``
    forbids optional whitespace in JSON (compact output)."""

    json: str | dict | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | tuple[str, ...] | None = None
    grammar: str | None = None
    structural_tag: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"structured outputs need exactly one of {list(KINDS)}, got {given or 'none'}")
        kind = given[0]
        value = getattr(self, kind)
        if kind == "json":
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except ValueError as exc:
                    raise ValueError(f"structured outputs json is not valid JSON: {exc}") from None
            else:
                parsed = value
            if not isinstance(parsed, (dict, bool)):
                raise ValueError("structured outputs json must be a JSON Schema object")
        elif kind == "json_object":
            if value is not True:
                raise ValueError("json_object must be true")
        elif kind == "choice":
            if not isinstance(value, (list, tuple)) or not value or not all(isinstance(c, str) and c for c in value):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            if len(value) > MAX_CHOICES:
                raise ValueError(f"choice has {len(value)} entries; at most {MAX_CHOICES}")
        elif not isinstance(value, str) or not value:
            raise ValueError(f"structured outputs {kind} must be a non-empty string")
        if len(self.spec) > MAX_SPEC_CHARS:
            raise ValueError(f"the {kind} constraint has {len(self.spec)} characters; at most {MAX_SPEC_CHARS}")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def spec(self) -> str:
        """The constraint as text (JSON schemas canonicalised, choices as a JSON list)."""
        value: Any = getattr(self, self.kind)
        if self.kind == "json":
            return json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)
        if self.kind == "choice":
            return json.dumps(list(value))
        return "" if self.kind == "json_object" else value

    @property
    def key(self) -> tuple[str, str, bool]:
        """What the compile cache keys on."""
        return self.kind, self.spec, self.disable_any_whitespace
