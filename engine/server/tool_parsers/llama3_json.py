"""The ``llama3_json`` tool parser: Llama 3.1 / 3.2 / 3.3 JSON tool calls.

With JSON tools the model answers with nothing but the call, optionally after ``<|python_tag|>``::

    <|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}

(``"arguments"`` is accepted for ``"parameters"``; other keys such as ``"type": "function"`` are
ignored), several calls separated by ``;`` (or just whitespace). The output is a tool call only if
it starts (after whitespace) with ``<|python_tag|>`` or ``{``; anything else is plain content, so
is a JSON answer that is not a call object (no ``"name"`` string, no arguments object). Once a
call fails to parse, it and everything after it is content, verbatim (a first call that fails
leaves the whole output as content); text after the last call is content too.
"""

from __future__ import annotations

from ._call import CallObjectParser
from .base import JsonCallStreamer, ToolParser, skip_ws

_START, _EXPECT_CALL, _BODY, _AFTER_CALL, _CONTENT, _DISCARD = range(6)


class Llama3JsonToolParser(ToolParser):
    """A JSON call object (or several, ``;``-separated) as the whole output."""

    name = "llama3_json"
    python_tag = "<|python_tag|>"

    def __init__(self, *, incremental: bool = False):
        super().__init__(incremental=incremental)
        self._state = _START
        self._region_start = 0
        self._call: JsonCallStreamer | None = None

    def _fail(self) -> None:
        """Everything from the end of the last call on is content."""
        self._pos = self._region_start
        self._state = _CONTENT

    def _start_call(self, pos: int) -> None:
        self._pos = pos
        self._call = JsonCallStreamer(self, CallObjectParser(), self.incremental)
        self._state = _BODY

    _offset_attrs = ("_region_start",)

    def _needed_from(self) -> int:
        return self._region_start if self._state not in (_CONTENT, _DISCARD) else self._pos

    def _advance(self, final: bool) -> None:
        text = self._text
        while True:
            pos = self._pos
            st = self._state
            if st == _CONTENT:
                self._add_content(text[pos:])
                self._pos = len(text)
                return
            if st == _DISCARD:
                self._pos = len(text)
                return
            if st in (_START, _EXPECT_CALL, _AFTER_CALL):
                j = skip_ws(text, pos)
                if j == len(text):
                    if not final:
                        return
                    if st == _EXPECT_CALL:  # a tag or ";" with no call after it
                        self._fail()
                        continue
                    self._add_content(text[pos:])  # only whitespace: dropped by the content rule
                    self._pos = j
                    return
                ch = text[j]
                if ch == "{":
                    self._start_call(j)
                    continue
                if st == _START:
                    rest = text[j:j + len(self.python_tag)]
                    if rest == self.python_tag:
                        self._pos = j + len(rest)
                        self._state = _EXPECT_CALL
                        continue
                    if self.python_tag.startswith(rest) and not final:
                        return  # may still become the tag
                elif st == _AFTER_CALL and ch == ";":
                    self._pos = j + 1
                    self._state = _EXPECT_CALL
                    continue
                self._fail()
                continue
            # _BODY
            pos, outcome = self._call.feed(text, pos, final)
            self._pos = pos
            if outcome == JsonCallStreamer.FAILED:
                self._fail()
                continue
            if outcome == JsonCallStreamer.BROKEN:
                self._state = _DISCARD
                continue
            if outcome == JsonCallStreamer.DONE:
                self._call.complete()
                self._region_start = pos
                self._state = _AFTER_CALL
                continue
            return
