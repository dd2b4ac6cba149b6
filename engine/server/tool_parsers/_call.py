"""``CallObjectParser``: a call object ``{"name": "f", "arguments": {...}, ...}``, read incrementally
with ``_json.JsonValueScanner``: the name as soon as it is complete, the canonical arguments text
as it grows."""

from __future__ import annotations

import json

from ._json import _WS, JsonValueScanner

_ARG_KEYS = ("arguments", "parameters")
# call-object states
_C_START, _C_KEY_OR_END, _C_KEY, _C_KEY_STR, _C_COLON, _C_VALUE, _C_AFTER = range(7)


class CallObjectParser:
    """Incrementally parses ``{"name": "<str>", "arguments" | "parameters": {<object>}, ...}``.

    Other keys are scanned and ignored; a missing or non-string name, missing, non-object or
    repeated arguments, or any JSON error sets ``error``. ``name`` is set once the name string is
    complete; ``args_started`` once the arguments object has begun; ``take_args()`` returns the
    canonical arguments text produced since its previous call. ``done`` is set at the closing brace.
    """

    def __init__(self):
        self.name: str | None = None
        self.args_started = False
        self.args_done = False
        self.done = False
        self.error = False
        self._state = _C_START
        self._sub: JsonValueScanner | None = None
        self._key: str | None = None
        self._args: list[str] = []

    def take_args(self) -> str:
        """The canonical arguments text produced since the previous call."""
        out = "".join(self._args)
        self._args.clear()
        return out

    def close(self) -> None:
        """End of input: an incomplete object is an error."""
        if not self.done:
            self.error = True

    def feed(self, text: str, pos: int = 0) -> int:
        """Consumes ``text[pos:]`` as far as possible; returns the position reached."""
        n = len(text)
        while pos < n and not self.done and not self.error:
            st = self._state
            if st in (_C_KEY_STR, _C_VALUE):
                sub = self._sub
                pos = sub.feed(text, pos)
                if st == _C_VALUE and self._key in _ARG_KEYS:
                    if sub.started and not self.args_started:
                        self.args_started = True
                    self._args.append(sub.take())
                if sub.error:
                    self.error = True
                    break
                if not sub.done:
                    continue  # input exhausted inside the value
                self._value_done(st, sub)
                continue
            ch = text[pos]
            if ch in _WS:
                pos += 1
                continue
            if st == _C_START:
                if ch != "{":
                    self.error = True
                    break
                self._state = _C_KEY_OR_END
            elif st in (_C_KEY_OR_END, _C_KEY):
                if ch == '"':
                    self._sub = JsonValueScanner('"')
                    self._state = _C_KEY_STR
                    continue  # the scanner consumes the quote
                if st == _C_KEY_OR_END and ch == "}":
                    self._finish()
                else:
                    self.error = True
                    break
            elif st == _C_COLON:
                if ch != ":":
                    self.error = True
                    break
                if self._key == "name":
                    if self.name is not None:
                        self.error = True
                        break
                    self._sub = JsonValueScanner('"')
                elif self._key in _ARG_KEYS:
                    if self.args_started:
                        self.error = True
                        break
                    self._sub = JsonValueScanner("{")
                else:
                    self._sub = JsonValueScanner()
                self._state = _C_VALUE
            elif st == _C_AFTER:
                if ch == ",":
                    self._state = _C_KEY
                elif ch == "}":
                    self._finish()
                else:
                    self.error = True
                    break
            pos += 1
        return pos

    def _value_done(self, st: int, sub: JsonValueScanner) -> None:
        if st == _C_KEY_STR:
            self._key = json.loads(sub.take())
            self._state = _C_COLON
            return
        if self._key == "name":
            self.name = json.loads(sub.take())
            if not self.name:
                self.error = True
        elif self._key in _ARG_KEYS:
            self.args_done = True
        self._state = _C_AFTER

    def _finish(self) -> None:
        if self.name is None or not self.args_done:
            self.error = True
        else:
            self.done = True
