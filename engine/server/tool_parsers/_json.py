"""Incremental JSON scanning for the tool-call parsers.

``JsonValueScanner`` reads one JSON value character by character (chunks of any size, in any split)
and writes it out in the *canonical layout*: the layout of ``json.dumps(value, ensure_ascii=False)``
(``", "`` between items, ``": "`` after keys, no other whitespace), strings re-escaped as
``json.dumps`` escapes them (``\\"``, ``\\\\``, ``\\n``, ``\\r``, ``\\t``, ``\\b``, ``\\f``,
``\\u00XX`` for other control characters, everything else literal, so ``\\u00e9`` becomes ``é``
and ``\\/`` becomes ``/``), numbers as ``json.dumps(json.loads(number))`` writes them (``1E5`` becomes
``100000.0``; one that would overflow to infinity stays as written). Because the output
is produced character by character, the concatenation of the pieces is the same however the input
was split: the streaming and the whole-text paths of a parser agree exactly.

So the canonical text equals ``json.dumps(json.loads(raw), ensure_ascii=False)`` except in three
corner cases: duplicate keys are all kept (in order), a lone UTF-16 surrogate escape stays an escape
(``\\ud83d``) so that the result is always encodable as UTF-8, and a number that ``json.loads`` reads
as infinity (``1e999``) or cannot convert stays as written.
Raw control characters inside strings (a literal newline in a code argument) are accepted, as
``json.loads(strict=False)`` accepts them, and re-escaped.

``_call.CallObjectParser`` reads a whole call object with it.
"""

from __future__ import annotations

import json
import math
import re

_WS = " \t\n\r"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_PLAIN_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_SIMPLE_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_OUT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b", "\f": "\\f"}
_HEX = frozenset("0123456789abcdefABCDEF")

# scanner states
_VALUE, _OBJ_FIRST, _OBJ_KEY, _COLON, _ARR_FIRST, _AFTER = range(6)
_STR, _ESC, _HEXDIGITS, _LOW_BACKSLASH, _LOW_U, _NUM, _LIT, _DONE = range(6, 14)


def _escape_char(ch: str) -> str:
    """One decoded string character in the canonical (``json.dumps(ensure_ascii=False)``) spelling."""
    out = _OUT_ESCAPES.get(ch)
    if out is not None:
        return out
    code = ord(ch)
    if code < 0x20 or 0xD800 <= code <= 0xDFFF:
        return "\\u%04x" % code
    return ch


class JsonValueScanner:
    """Incrementally scans one JSON value and produces its canonical text.

    ``feed(text, pos)`` consumes ``text`` from ``pos`` until the value is complete, the input runs
    out, or an error is found, and returns the position reached (a number is only known to be
    complete at the character after it, which is not consumed). ``take()`` returns the canonical
    text produced since the last call. ``close()`` marks the end of the input: a pending top-level
    number completes, anything else incomplete becomes an error. ``done`` / ``error`` report the
    outcome. With ``require=c`` the value must start with the character ``c`` (``"{"``, ``'"'``).
    """

    def __init__(self, require: str | None = None):
        self.require = require
        self.done = False
        self.error = False
        self.started = False
        self._state = _VALUE
        self._stack: list[str] = []
        self._out: list[str] = []
        self._tok: list[str] = []
        self._lit = ""
        self._hex: list[str] = []
        self._high: int | None = None
        self._in_key = False

    def take(self) -> str:
        """The canonical text produced since the previous ``take``."""
        out = "".join(self._out)
        self._out.clear()
        return out

    def close(self) -> None:
        """End of input: completes a top-level number, fails anything else that is incomplete."""
        if self.done or self.error:
            return
        if self._state == _NUM and not self._stack:
            self._finish_number()
        if not self.done:
            self.error = True

    def _close_value(self) -> None:
        self._state = _AFTER if self._stack else _DONE
        if not self._stack:
            self.done = True

    def _finish_number(self) -> bool:
        tok = "".join(self._tok)
        if not _NUMBER.fullmatch(tok):
            self.error = True
            return False
        try:  # as json.dumps writes the number; kept verbatim where that would not be JSON
            value = json.loads(tok)
            if isinstance(value, int) or math.isfinite(value):
                tok = json.dumps(value)
        except ValueError:  # an integer too long to convert
            pass
        self._out.append(tok)
        self._close_value()
        return True

    def _emit_code_point(self, code: int) -> None:
        self._out.append(_escape_char(chr(code)))

    def feed(self, text: str, pos: int = 0) -> int:  # noqa: C901 - one state machine
        """Consumes ``text[pos:]`` as far as possible; returns the position reached."""
        n = len(text)
        out = self._out
        while pos < n and not self.done and not self.error:
            st = self._state
            ch = text[pos]
            if st == _STR:
                m = _PLAIN_RUN.match(text, pos)
                if m:
                    out.append(m.group())
                    pos = m.end()
                    continue
                if ch == '"':
                    out.append('"')
                    if self._in_key:
                        self._in_key = False
                        self._state = _COLON
                    else:
                        self._close_value()
                elif ch == "\\":
                    self._state = _ESC
                else:  # a raw control character: accepted (strict=False) and re-escaped
                    out.append(_escape_char(ch))
                pos += 1
                continue
            if st == _ESC:
                if ch in _SIMPLE_ESCAPES:
                    out.append(_escape_char(_SIMPLE_ESCAPES[ch]))
                    self._state = _STR
                elif ch == "u":
                    self._hex = []
                    self._state = _HEXDIGITS
                else:
                    self.error = True
                    break
                pos += 1
                continue
            if st == _HEXDIGITS:
                if ch not in _HEX:
                    self.error = True
                    break
                self._hex.append(ch)
                pos += 1
                if len(self._hex) == 4:
                    self._code_point(int("".join(self._hex), 16))
                continue
            if st in (_LOW_BACKSLASH, _LOW_U):
                want = "\\" if st == _LOW_BACKSLASH else "u"
                if ch == want:
                    pos += 1
                    if st == _LOW_BACKSLASH:
                        self._state = _LOW_U
                    else:
                        self._hex = []
                        self._state = _HEXDIGITS
                    continue
                # the high surrogate stands alone
                self._emit_code_point(self._high)
                self._high = None
                # after "\\" the character starts another escape; otherwise it is string text
                self._state = _STR if st == _LOW_BACKSLASH else _ESC
                continue
            if st == _NUM:
                if ch in _NUMBER_CHARS:
                    self._tok.append(ch)
                    pos += 1
                    continue
                if not self._finish_number():
                    break
                continue  # the terminating character is processed in the new state
            if st == _LIT:
                want = self._lit[len(self._tok)]
                if ch != want:
                    self.error = True
                    break
                self._tok.append(ch)
                pos += 1
                if len(self._tok) == len(self._lit):
                    out.append(self._lit)
                    self._close_value()
                continue
            if ch in _WS:
                pos += 1
                continue
            if st == _VALUE or st == _ARR_FIRST:
                if st == _ARR_FIRST and ch == "]":
                    self._stack.pop()
                    out.append("]")
                    self._close_value()
                    pos += 1
                    continue
                if not self.started:
                    self.started = True
                    if self.require is not None and ch != self.require:
                        self.error = True
                        break
                pos += 1
                if ch == "{":
                    self._stack.append("{")
                    out.append("{")
                    self._state = _OBJ_FIRST
                elif ch == "[":
                    self._stack.append("[")
                    out.append("[")
                    self._state = _ARR_FIRST
                elif ch == '"':
                    out.append('"')
                    self._state = _STR
                elif ch in "-0123456789":
                    self._tok = [ch]
                    self._state = _NUM
                elif ch in "tfn":
                    self._lit = {"t": "true", "f": "false", "n": "null"}[ch]
                    self._tok = [ch]
                    self._state = _LIT
                else:
                    self.error = True
                    pos -= 1
                    break
                continue
            if st == _OBJ_FIRST or st == _OBJ_KEY:
                if st == _OBJ_FIRST and ch == "}":
                    self._stack.pop()
                    out.append("}")
                    self._close_value()
                elif ch == '"':
                    out.append('"')
                    self._state = _STR
                    self._in_key = True
                else:
                    self.error = True
                    break
                pos += 1
                continue
            if st == _COLON:
                if ch != ":":
                    self.error = True
                    break
                out.append(": ")
                self._state = _VALUE
                pos += 1
                continue
            if st == _AFTER:
                top = self._stack[-1]
                if ch == ",":
                    out.append(", ")
                    self._state = _OBJ_KEY if top == "{" else _VALUE
                elif (ch == "}" and top == "{") or (ch == "]" and top == "["):
                    self._stack.pop()
                    out.append(ch)
                    self._close_value()
                else:
                    self.error = True
                    break
                pos += 1
                continue
            self.error = True  # pragma: no cover - unreachable
            break
        return pos

    def _code_point(self, code: int) -> None:
        if self._high is not None:
            high, self._high = self._high, None
            if 0xDC00 <= code <= 0xDFFF:
                self._emit_code_point(0x10000 + ((high - 0xD800) << 10) + (code - 0xDC00))
                self._state = _STR
                return
            self._emit_code_point(high)
        if 0xD800 <= code <= 0xDBFF:
            self._high = code
            self._state = _LOW_BACKSLASH
            return
        self._emit_code_point(code)
        self._state = _STR
