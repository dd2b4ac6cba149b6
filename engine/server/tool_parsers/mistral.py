"""The ``mistral`` tool parser: Mistral / Mixtral / Mistral-Nemo / Mistral-Small tool calls.

Content comes first, then the ``[TOOL_CALLS]`` marker and the calls, in one of two layouts:

* a JSON array of call objects (tokenizer v3 to v7)::

      [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "f", "arguments": {}}]

* ``name[ARGS]{arguments}`` after each marker (tokenizer v11 and later)::

      [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]f[ARGS]{}

A call object needs a ``"name"`` string and an ``"arguments"`` (or ``"parameters"``) object; other
keys (Mistral's ``"id"``) are ignored. An array is all or nothing: if any element is malformed, or
the array is cut off before its ``]``, the marker and the array stay content, verbatim, and parsing
resumes where it went wrong. An empty array is content. Text after the calls is content. (With
``incremental=True`` each element is sent as it streams, so a later bad element cannot take back the
earlier ones: only the text from the bad element on is content.)
"""

from __future__ import annotations

import re

from ._call import CallObjectParser
from ._json import JsonValueScanner
from .base import JsonCallStreamer, ToolParser, partial_suffix, skip_ws

_CONTENT, _MARKER, _ARR_FIRST, _ELEM, _ARR_AFTER, _ARR_NEXT, _V11_NAME, _V11_ARGS, _DISCARD = range(9)
_NAME_CHARS = re.compile(r"[A-Za-z0-9_.\-]*")


class _ArgsOnly:
    """A ``CallObjectParser`` look-alike for the v11 layout, where the name comes before ``[ARGS]``."""

    def __init__(self, name: str):
        self.name = name
        self._scanner = JsonValueScanner("{")

    @property
    def args_started(self) -> bool:
        return self._scanner.started

    @property
    def done(self) -> bool:
        return self._scanner.done

    @property
    def error(self) -> bool:
        return self._scanner.error

    def feed(self, text: str, pos: int) -> int:
        return self._scanner.feed(text, pos)

    def close(self) -> None:
        self._scanner.close()

    def take_args(self) -> str:
        return self._scanner.take()


class MistralToolParser(ToolParser):
    """``[TOOL_CALLS]`` followed by a JSON array of calls or by ``name[ARGS]{...}``."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    args_marker = "[ARGS]"

    def __init__(self, *, incremental: bool = False):
        super().__init__(incremental=incremental)
        self._state = _CONTENT
        self._region_start = 0
        self._call: JsonCallStreamer | None = None
        self._pending: list[tuple[str, str]] = []  # validated array elements, sent at the "]"

    def _fail(self, pos: int) -> None:
        """The calls are malformed at ``pos``: their text so far is content, parsing resumes at ``pos``."""
        self._add_content(self._text[self._region_start:pos])
        self._pending.clear()
        self._pos = pos
        self._state = _CONTENT

    def _new_call(self, parser, pos: int, state: int) -> None:
        self._call = JsonCallStreamer(self, parser, self.incremental)
        self._pos = pos
        self._state = state

    _offset_attrs = ("_region_start",)

    def _needed_from(self) -> int:
        return self._region_start if self._state not in (_CONTENT, _DISCARD) else self._pos

    def _advance(self, final: bool) -> None:  # noqa: C901 - one state machine
        text = self._text
        n = len(text)
        while True:
            pos = self._pos
            st = self._state
            if st == _CONTENT:
                i = text.find(self.marker, pos)
                if i < 0:
                    end = n if final else n - partial_suffix(text, pos, self.marker)
                    self._add_content(text[pos:end])
                    self._pos = end
                    return
                self._add_content(text[pos:i])
                self._region_start = i
                self._pos = i + len(self.marker)
                self._state = _MARKER
                continue
            if st == _DISCARD:
                self._pos = n
                return
            if st in (_ELEM, _V11_ARGS):
                pos, outcome = self._call.feed(text, pos, final)
                self._pos = pos
                if outcome == JsonCallStreamer.FAILED:
                    self._fail(pos)
                elif outcome == JsonCallStreamer.BROKEN:
                    self._state = _DISCARD
                elif outcome == JsonCallStreamer.DONE:
                    if st == _ELEM and not self.incremental:
                        parser = self._call.parser
                        self._pending.append((parser.name, parser.take_args()))
                    else:
                        self._call.complete()
                        self._region_start = pos
                    self._state = _ARR_AFTER if st == _ELEM else _CONTENT
                else:
                    return
                continue
            if st == _V11_NAME:
                m = _NAME_CHARS.match(text, pos)
                j = m.end()
                rest = text[j:j + len(self.args_marker)]
                if rest == self.args_marker and j > pos:
                    self._new_call(_ArgsOnly(text[pos:j]), j + len(rest), _V11_ARGS)
                    continue
                if j == n or (self.args_marker.startswith(rest) and j + len(rest) == n):
                    if final:
                        self._fail(n)
                        continue
                    return
                self._fail(j)
                continue
            # the states between the JSON pieces: skip whitespace, look at one character
            j = skip_ws(text, pos)
            if j == n:
                if final:
                    self._fail(n)
                    continue
                return
            ch = text[j]
            if st == _MARKER:
                if ch == "[":
                    self._pos = j + 1
                    self._state = _ARR_FIRST
                elif _NAME_CHARS.match(ch).end():
                    self._pos = j
                    self._state = _V11_NAME
                else:
                    self._fail(j)
            elif st in (_ARR_FIRST, _ARR_NEXT):
                if ch == "{":
                    self._new_call(CallObjectParser(), j, _ELEM)
                else:
                    self._fail(j)
            elif st == _ARR_AFTER:
                if ch == ",":
                    self._pos = j + 1
                    self._state = _ARR_NEXT
                elif ch == "]":
                    for name, arguments in self._pending:
                        self._emit_call(name, arguments)
                    self._pending.clear()
                    self._pos = j + 1
                    self._state = _CONTENT
                else:
                    self._fail(j)
