"""The ``hermes`` tool parser: Hermes-2-Pro / Qwen2.5 / Qwen3 style tool calls.

The model writes each call as a block::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

possibly several, with content before, between or after them. A block holds exactly one call
object (``"arguments"``, or ``"parameters"``, must be an object; other keys are ignored). A block
whose JSON is malformed, or that has anything but whitespace between the object and
``</tool_call>``, stays content, verbatim; parsing resumes after the point where it went wrong, so
a later well-formed block is still a call. A block cut off after a complete object (no closing tag
at the end of the output) is accepted; one cut off inside the object stays content.
"""

from __future__ import annotations

from ._call import CallObjectParser
from .base import JsonCallStreamer, ToolParser, partial_suffix, skip_ws

_CONTENT, _BODY, _AFTER_JSON, _DISCARD = range(4)


class HermesToolParser(ToolParser):
    """``<tool_call>{json}</tool_call>`` blocks."""

    name = "hermes"
    start_tag = "<tool_call>"
    end_tag = "</tool_call>"

    def __init__(self, *, incremental: bool = False):
        super().__init__(incremental=incremental)
        self._state = _CONTENT
        self._block_start = 0
        self._call: JsonCallStreamer | None = None

    def _fail(self, pos: int) -> None:
        """The block is malformed at ``pos``: its text so far is content, parsing resumes at ``pos``."""
        self._add_content(self._text[self._block_start:pos])
        self._pos = pos
        self._state = _CONTENT

    _offset_attrs = ("_block_start",)

    def _needed_from(self) -> int:
        return self._block_start if self._state in (_BODY, _AFTER_JSON) else self._pos

    def _advance(self, final: bool) -> None:  # noqa: C901 - one state machine
        text = self._text
        while True:
            pos = self._pos
            if self._state == _CONTENT:
                i = text.find(self.start_tag, pos)
                if i < 0:
                    end = len(text) if final else len(text) - partial_suffix(text, pos, self.start_tag)
                    self._add_content(text[pos:end])
                    self._pos = end
                    return
                self._add_content(text[pos:i])
                self._block_start = i
                self._pos = i + len(self.start_tag)
                self._call = JsonCallStreamer(self, CallObjectParser(), self.incremental)
                self._state = _BODY
                continue
            if self._state == _BODY:
                pos, outcome = self._call.feed(text, pos, final)
                self._pos = pos
                if outcome == JsonCallStreamer.FAILED:
                    self._fail(pos)
                    continue
                if outcome == JsonCallStreamer.BROKEN:
                    self._state = _DISCARD
                    continue
                if outcome == JsonCallStreamer.DONE:
                    self._state = _AFTER_JSON
                    continue
                return  # pending: more text needed
            if self._state == _AFTER_JSON:
                j = skip_ws(text, pos)
                rest = text[j:j + len(self.end_tag)]
                if rest == self.end_tag:
                    self._call.complete()
                    self._pos = j + len(self.end_tag)
                    self._state = _CONTENT
                    continue
                if self.end_tag.startswith(rest):  # the tag may still come
                    if final:  # cut off before (or inside) the closing tag: accepted
                        self._call.complete()
                        self._pos = len(text)
                        self._state = _CONTENT
                        continue
                    return
                if self._call.opened:  # already sent in full: junk before the tag is dropped
                    self._call.complete()
                    self._state = _DISCARD
                    continue
                self._fail(j)
                continue
            # _DISCARD: a call already sent went wrong; drop its text up to the closing tag
            i = text.find(self.end_tag, pos)
            if i < 0:
                self._pos = len(text) if final else len(text) - partial_suffix(text, pos, self.end_tag)
                return
            self._pos = i + len(self.end_tag)
            self._state = _CONTENT
