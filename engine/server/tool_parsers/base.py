"""The tool-parser interface and the streaming machinery every parser shares.

A parser turns a model's raw output into content and tool calls, either for the whole output
(``extract``) or delta by delta while it streams (``stream`` then ``finish``; one instance per
choice). Both paths run the same character-level state machine, so they agree exactly:

* the streamed content deltas concatenate to ``extract(text).content`` (``""`` where it is ``None``);
* the streamed tool calls are ``extract``'s, in order: for each, a header delta (``index`` 0, 1, ...,
  ``id`` ``"call_"`` + 24 random alphanumerics, ``name``, ``arguments=""``), then argument pieces
  that concatenate to the call's ``arguments``.

Content is the text outside the valid tool calls, cut into segments by the calls; a segment that is
only whitespace (the newline between two calls, before the first, after the last) is dropped, any
other segment is kept verbatim. While streaming, content is sent as soon as it cannot be the start
of a tool-call marker and, for a segment, once it holds something other than whitespace.

``arguments`` is always a JSON object in the canonical layout of ``_json`` (the layout of
``json.dumps(obj, ensure_ascii=False)``).

By default a tool call is streamed once it is complete and valid (its arguments then come as one
piece): a malformed or truncated call stays content, exactly as ``extract`` reports it. With
``incremental=True`` a call's header is sent as soon as its name is known and its arguments have
begun, and the arguments follow piece by piece as they arrive; a call that then turns out malformed
or is cut off has already been sent, its remaining text is dropped, and it can differ from
``extract`` (which always validates first). Parsers whose format cannot be streamed that way
(``pythonic``) ignore the flag.
"""

from __future__ import annotations

import secrets
import string
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

_ID_ALPHABET = string.ascii_letters + string.digits


def make_tool_call_id() -> str:
    """A fresh OpenAI-style tool-call id: ``"call_"`` followed by 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass
class ToolCall:
    """One complete tool call; ``arguments`` is the JSON text of an object."""

    id: str
    name: str
    arguments: str


@dataclass
class ExtractedToolCalls:
    """The result of parsing a whole output: the calls and the text outside them (None if blank)."""

    tools_called: bool
    tool_calls: list[ToolCall]
    content: str | None


@dataclass
class ToolCallDelta:
    """A streamed piece of the tool call at ``index``: its header (id and name) or an arguments piece."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None


@dataclass
class DeltaMessage:
    """What one streamed delta of model text turns into: content and tool-call pieces."""

    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


def partial_suffix(text: str, start: int, marker: str) -> int:
    """The length of the longest proper prefix of ``marker`` that ``text[start:]`` ends with."""
    for k in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def skip_ws(text: str, pos: int) -> int:
    """The first position at or after ``pos`` that is not whitespace."""
    n = len(text)
    while pos < n and text[pos] in " \t\n\r":
        pos += 1
    return pos


class ToolParser(ABC):
    """Base class: subclasses implement ``_advance(final)``, which consumes ``self._text`` from
    ``self._pos`` and reports through ``_add_content``, ``_emit_call``, ``_open_call`` /
    ``_call_piece`` / ``_close_call`` (the incremental path)."""

    #: the name of the parser in ``TOOL_PARSERS``
    name = ""

    def __init__(self, *, incremental: bool = False):
        self.incremental = incremental
        self._text = ""
        self._pos = 0
        self._index = 0
        self._open_id: str | None = None
        self._finished = False
        self._events_content: list[str] = []
        self._events_tools: list[ToolCallDelta] = []
        self._seg_ws = ""
        self._seg_has_text = False

    # --- public interface ---------------------------------------------------------------

    def extract(self, text: str) -> ExtractedToolCalls:
        """Parses a whole output; never raises on malformed calls (they stay content)."""
        machine = type(self)()  # always the validating (non-incremental) machine
        machine._text = text
        machine._advance(final=True)
        calls: list[ToolCall] = []
        for delta in machine._events_tools:
            if delta.id is not None:
                calls.append(ToolCall(id=delta.id, name=delta.name or "", arguments=""))
            elif delta.arguments:
                calls[-1].arguments += delta.arguments
        content = "".join(machine._events_content)
        return ExtractedToolCalls(tools_called=bool(calls), tool_calls=calls,
                                  content=content if content.strip() else None)

    def stream(self, delta_text: str) -> DeltaMessage | None:
        """Feeds the next piece of the output; returns what can be sent now, or None."""
        if self._finished:
            raise RuntimeError("stream() after finish()")
        if not delta_text:
            return None
        self._text += delta_text
        self._advance(final=False)
        self._compact()
        return self._drain()

    def finish(self) -> DeltaMessage | None:
        """Ends the output: flushes held-back text and decides any pending call."""
        if self._finished:
            return None
        self._finished = True
        self._advance(final=True)
        return self._drain()

    # --- helpers for subclasses -----------------------------------------------------------

    #: the attributes holding positions in ``self._text`` (besides ``_pos``), shifted by ``_compact``
    _offset_attrs: tuple[str, ...] = ()

    def _needed_from(self) -> int:
        """The first position of ``self._text`` that the parser may still need."""
        return self._pos

    def _compact(self) -> None:
        """Drops the text the parser no longer needs, once that is most of it (amortised linear)."""
        k = self._needed_from()
        if k >= 1024 and 2 * k >= len(self._text):
            self._text = self._text[k:]
            self._pos -= k
            for attr in self._offset_attrs:
                setattr(self, attr, getattr(self, attr) - k)

    @abstractmethod
    def _advance(self, final: bool) -> None:
        """Consumes ``self._text`` from ``self._pos`` as far as it can be decided."""

    def _add_content(self, text: str) -> None:
        """Adds text to the current content segment (whitespace-only segments are held back)."""
        if not text:
            return
        if self._seg_has_text:
            self._events_content.append(text)
        elif text.strip():
            self._events_content.append(self._seg_ws + text)
            self._seg_ws = ""
            self._seg_has_text = True
        else:
            self._seg_ws += text

    def _end_segment(self) -> None:
        """A tool call starts: the current content segment ends (dropped if only whitespace)."""
        self._seg_ws = ""
        self._seg_has_text = False

    def _open_call(self, name: str) -> None:
        """Sends a call's header (the incremental path; ``_emit_call`` does it all at once)."""
        self._end_segment()
        self._open_id = make_tool_call_id()
        self._events_tools.append(ToolCallDelta(index=self._index, id=self._open_id, name=name, arguments=""))

    def _call_piece(self, piece: str) -> None:
        """Sends a piece of the open call's arguments."""
        if piece:
            self._events_tools.append(ToolCallDelta(index=self._index, arguments=piece))

    def _close_call(self) -> None:
        """The open call is finished (complete or broken): the next call gets the next index."""
        self._open_id = None
        self._index += 1
        self._end_segment()

    def _emit_call(self, name: str, arguments: str) -> None:
        """Sends a complete call: its header, then its arguments as one piece."""
        self._open_call(name)
        self._call_piece(arguments)
        self._close_call()

    def _drain(self) -> DeltaMessage | None:
        content = "".join(self._events_content) or None
        tools = self._events_tools
        self._events_content = []
        self._events_tools = []
        if content is None and not tools:
            return None
        return DeltaMessage(content=content, tool_calls=tools)


class JsonCallStreamer:
    """Drives a ``CallObjectParser`` for a parser: sends the call through the parser's helpers,
    at once (validated) or incrementally, and tells whether it is complete, pending or broken."""

    PENDING, DONE, FAILED, BROKEN = range(4)

    def __init__(self, owner: ToolParser, parser, incremental: bool):
        self.owner = owner
        self.parser = parser
        self.incremental = incremental
        self.opened = False

    def feed(self, text: str, pos: int, final: bool) -> tuple[int, int]:
        """Feeds the call text; returns (new position, outcome). ``BROKEN``: it failed after its
        header was sent (incremental only); ``FAILED``: it failed before anything was sent."""
        p = self.parser
        pos = p.feed(text, pos)
        if final and not p.done and not p.error:
            p.close()
        if self.incremental and not p.error:
            if not self.opened and p.name is not None and p.args_started:
                self.owner._open_call(p.name)
                self.opened = True
            if self.opened:
                self.owner._call_piece(p.take_args())
        if p.error:
            if self.opened:
                self.owner._close_call()
                return pos, self.BROKEN
            return pos, self.FAILED
        if p.done:
            return pos, self.DONE
        return pos, self.PENDING

    def complete(self) -> None:
        """Sends (the rest of) a call that parsed completely."""
        if not self.opened:
            self.owner._open_call(self.parser.name)
            self.opened = True
        self.owner._call_piece(self.parser.take_args())
        self.owner._close_call()
