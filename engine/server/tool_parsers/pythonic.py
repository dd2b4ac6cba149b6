"""The ``pythonic`` tool parser: Llama 3.2 / Llama 4 pythonic tool calls.

The model answers with a Python list of calls, keyword arguments only::

    [get_weather(city="Paris", days=3), get_time()]

optionally between Llama 4's ``<|python_start|>`` and ``<|python_end|>``. The list is parsed with
``ast`` (nothing is evaluated) and accepted only if every element is ``name(key=literal, ...)``
with a plain function name, where a literal is a string, a number (finite, optionally signed), a
boolean, ``None``, or a list, tuple or dict (string keys) of literals; ``true``, ``false`` and
``null`` are accepted as JSON spellings. The arguments become a JSON object
(``json.dumps(kwargs, ensure_ascii=False)``, in the order written). The output is a tool call only
if it starts (after whitespace) with the list; anything else, including a list that fails those
rules, an empty list or a list cut off before its ``]``, leaves the whole output as content. Text
after the list is content.

While streaming, the list is held back until its closing ``]`` (the calls are sent then); content is
released as soon as the text cannot be such a list. ``incremental`` has no effect here.
"""

from __future__ import annotations

import ast
import json
import math
import re

from .base import ToolParser, skip_ws

_START, _LIST, _AFTER_LIST, _CONTENT = range(4)
# what the start of a list of calls can look like: "[", then a (partial) name, then "("
_CALL_LIST_PREFIX = re.compile(r"\[\s*(?:[A-Za-z_][A-Za-z0-9_]*\s*(?:\(.*)?)?", re.DOTALL)
_JSON_NAMES = {"true": True, "false": False, "null": None}


class _NotALiteral(Exception):
    pass


def _literal(node: ast.AST):
    """The Python value of a literal node; raises ``_NotALiteral`` for anything else."""
    if isinstance(node, ast.Constant):
        value = node.value
        if value is None or isinstance(value, (str, bool, int)):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        raise _NotALiteral
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = node.operand
        if (isinstance(operand, ast.Constant) and isinstance(operand.value, (int, float))
                and not isinstance(operand.value, bool)):
            return _literal(operand) if isinstance(node.op, ast.UAdd) else -_literal(operand)
        raise _NotALiteral
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        out = {}
        for key, value in zip(node.keys, node.values):
            if not (isinstance(key, ast.Constant) and isinstance(key.value, str)):
                raise _NotALiteral  # also ``**mapping`` (key None)
            out[key.value] = _literal(value)
        return out
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    raise _NotALiteral


def parse_call_list(source: str) -> list[tuple[str, str]] | None:
    """``[(name, arguments JSON), ...]`` for a valid list of calls, else None (never raises)."""
    try:
        tree = ast.parse(source.strip(), mode="eval")
        if not isinstance(tree.body, ast.List) or not tree.body.elts:
            return None
        calls = []
        for node in tree.body.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
                return None
            kwargs = {}
            for kw in node.keywords:
                if kw.arg is None:  # **kwargs
                    return None
                kwargs[kw.arg] = _literal(kw.value)
            calls.append((node.func.id, json.dumps(kwargs, ensure_ascii=False)))
        return calls
    except Exception:  # noqa: BLE001 - SyntaxError, _NotALiteral, RecursionError, int too long, ...
        return None


class _BracketScanner:
    """Finds where a Python list closes, incrementally: tracks (), [] and {} depth outside strings
    (single, double, triple quoted, with backslash escapes) and comments."""

    def __init__(self):
        self.depth = 0
        self._quote = ""  # the open string's quote ("'", '"', "'''" or '"""'), "" outside
        self._comment = False

    def scan(self, text: str, pos: int, final: bool) -> tuple[int, bool]:
        """Scans from ``pos``; returns (position reached, whether the outer list closed there)."""
        n = len(text)
        while pos < n:
            ch = text[pos]
            if self._comment:
                self._comment = ch != "\n"
            elif self._quote:
                if ch == "\\":
                    if pos + 1 >= n:
                        return pos, False  # need the escaped character
                    pos += 1
                elif text.startswith(self._quote, pos):
                    pos += len(self._quote) - 1
                    self._quote = ""
                elif ch == self._quote[0] and len(self._quote) == 3 and pos + 3 > n and not final:
                    return pos, False  # may be the closing triple quote
            elif ch in "'\"":
                if pos + 3 > n and not final:
                    return pos, False  # may open a triple-quoted string
                self._quote = ch * 3 if text.startswith(ch * 3, pos) else ch
                pos += len(self._quote) - 1
            elif ch == "#":
                self._comment = True
            elif ch in "([{":
                self.depth += 1
            elif ch in ")]}":
                self.depth -= 1
                if self.depth == 0:
                    return pos + 1, True
            pos += 1
        return pos, False


class PythonicToolParser(ToolParser):
    """A Python list of calls as the whole output."""

    name = "pythonic"
    start_tag = "<|python_start|>"
    end_tag = "<|python_end|>"

    def __init__(self, *, incremental: bool = False):
        super().__init__(incremental=incremental)
        self._state = _START
        self._list_start = 0
        self._scanner = _BracketScanner()
        self._prefix_ok = False  # the start of the list has been seen to look like a call

    def _not_calls(self) -> None:
        """The output is not a list of calls: all of it is content."""
        self._pos = 0
        self._state = _CONTENT

    _offset_attrs = ("_list_start",)

    def _needed_from(self) -> int:
        return 0 if self._state in (_START, _LIST) else self._pos

    def _advance(self, final: bool) -> None:  # noqa: C901 - one state machine
        text = self._text
        n = len(text)
        while True:
            pos = self._pos
            st = self._state
            if st == _CONTENT:
                self._add_content(text[pos:])
                self._pos = n
                return
            if st in (_START, _AFTER_LIST):
                j = skip_ws(text, pos)
                tag = self.start_tag if st == _START else self.end_tag
                rest = text[j:j + len(tag)]
                if rest == tag:
                    self._pos = j + len(tag)
                    if st == _AFTER_LIST:
                        self._state = _CONTENT
                    continue
                if tag.startswith(rest) and not final:
                    return  # whitespace, or maybe the tag
                if st == _AFTER_LIST:
                    self._state = _CONTENT
                elif j < n and text[j] == "[":
                    self._list_start = self._pos = j
                    self._state = _LIST
                elif j == n:  # only whitespace: content (which the content rule drops)
                    self._state = _CONTENT
                else:
                    self._not_calls()
                continue
            # _LIST
            if not self._prefix_ok:  # give up as soon as this cannot be "[name(" any more
                head = text[self._list_start:]
                if _CALL_LIST_PREFIX.fullmatch(head) is None:
                    self._not_calls()
                    continue
                self._prefix_ok = "(" in head
            pos, closed = self._scanner.scan(text, pos, final)
            self._pos = pos
            if closed:
                calls = parse_call_list(text[self._list_start:pos])
                if calls is None:
                    self._not_calls()
                    continue
                for name, arguments in calls:
                    self._emit_call(name, arguments)
                self._state = _AFTER_LIST
                continue
            if final:
                self._not_calls()
                continue
            return
