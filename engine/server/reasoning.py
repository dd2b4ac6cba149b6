"""Reasoning parsers (``--reasoning-parser``, vLLM's names): split ``<think>…</think>`` reasoning
from the answer, for the whole output (``extract``) or while it streams (``stream`` / ``finish``,
one instance per choice).

``deepseek_r1``
    DeepSeek-R1 and its distills. The chat template usually opens ``<think>`` in the prompt, so the
    output starts inside the reasoning: everything up to the first ``</think>`` is reasoning, the
    rest is the answer. A leading ``<think>`` (after optional whitespace) in the output is dropped.
    Without ``</think>`` (cut off by ``max_tokens``) all of the output is reasoning.
``qwen3``
    Qwen3 (the hybrid-thinking models, whose output opens ``<think>`` itself). The output has
    reasoning only if it starts (after optional whitespace) with ``<think>``; otherwise it is all
    answer (``enable_thinking=False``: the template puts the empty think block in the prompt). As in
    vLLM's parser with thinking enabled, a ``<think>`` that is never closed makes all of the rest
    reasoning. ``Qwen3ReasoningParser(think_in_prompt=True)`` is for the templates that open
    ``<think>`` in the prompt (Qwen3-*-Thinking-2507, QwQ): it then behaves as ``deepseek_r1``.

The texts are not stripped (the answer usually starts with the ``"\\n\\n"`` after ``</think>``), but
a reasoning or answer part that is only whitespace counts as absent: ``None``, and not streamed.
While streaming, text is released as soon as it cannot be part of a ``<think>`` / ``</think>`` tag
(and, for a part, once it holds something other than whitespace); the streamed reasoning and
answer deltas concatenate to ``extract``'s (``""`` where it says ``None``).

``is_reasoning_end(text)`` tells whether the output so far has left the reasoning (``</think>`` seen,
or for ``qwen3`` the output is known not to start with ``<think>``): structured outputs apply from
there on.
"""

from __future__ import annotations

import copy

_START, _REASONING, _CONTENT = range(3)
_WS = " \t\n\r"


def _partial_suffix(text: str, start: int, tag: str) -> int:
    """The length of the longest proper prefix of ``tag`` that ``text[start:]`` ends with."""
    for k in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    """``<think>…</think>`` splitting; subclasses choose what an output without ``<think>`` is."""

    name = ""
    start_token = "<think>"
    end_token = "</think>"
    #: whether an output that does not open with ``<think>`` starts inside the reasoning
    starts_in_reasoning = True

    def __init__(self):
        self._reset()

    def _reset(self) -> None:
        self._text = ""
        self._pos = 0
        self._state = _START
        self._finished = False
        # per part (reasoning, content): the held whitespace-only prefix, whether it has text
        self._held = ["", ""]
        self._has_text = [False, False]
        self._out: list[list[str]] = [[], []]

    def _fresh(self) -> ReasoningParser:
        """A parser with the same options that has seen nothing."""
        machine = copy.copy(self)
        machine._reset()
        return machine

    # --- public interface ---------------------------------------------------------------

    def extract(self, text: str) -> tuple[str | None, str | None]:
        """``(reasoning_content, content)`` of a whole output; each None if absent or blank."""
        machine = self._fresh()
        machine._text = text
        machine._advance(final=True)
        reasoning, content = ("".join(part) for part in machine._out)
        return reasoning or None, content or None

    def stream(self, delta_text: str) -> tuple[str | None, str | None]:
        """Feeds the next piece of the output; returns ``(reasoning_delta, content_delta)``."""
        if self._finished:
            raise RuntimeError("stream() after finish()")
        self._text += delta_text
        self._advance(final=False)
        if self._pos:  # nothing before the position is needed again
            self._text = self._text[self._pos:]
            self._pos = 0
        return self._drain()

    def finish(self) -> tuple[str | None, str | None]:
        """Ends the output: flushes any held-back text."""
        if self._finished:
            return None, None
        self._finished = True
        self._advance(final=True)
        return self._drain()

    def is_reasoning_end(self, text: str) -> bool:
        """Whether ``text`` (the output so far) has left the reasoning."""
        machine = self._fresh()
        machine._text = text
        machine._advance(final=False)
        return machine._state == _CONTENT

    @property
    def reasoning_ended(self) -> bool:
        """Whether the text streamed so far has left the reasoning."""
        return self._state == _CONTENT

    # --- the state machine ----------------------------------------------------------------

    def _add(self, part: int, text: str) -> None:
        if not text:
            return
        if self._has_text[part]:
            self._out[part].append(text)
        elif text.strip(_WS):
            self._out[part].append(self._held[part] + text)
            self._held[part] = ""
            self._has_text[part] = True
        else:
            self._held[part] += text

    def _advance(self, final: bool) -> None:
        text = self._text
        n = len(text)
        while True:
            pos = self._pos
            if self._state == _START:
                j = pos
                while j < n and text[j] in _WS:
                    j += 1
                rest = text[j:j + len(self.start_token)]
                if rest == self.start_token:
                    self._pos = j + len(rest)
                    self._state = _REASONING
                    continue
                if self.start_token.startswith(rest) and not final:
                    return  # only whitespace so far, or the tag may still come
                self._state = _REASONING if self.starts_in_reasoning else _CONTENT
                continue
            if self._state == _REASONING:
                i = text.find(self.end_token, pos)
                if i < 0:
                    end = n if final else n - _partial_suffix(text, pos, self.end_token)
                    self._add(0, text[pos:end])
                    self._pos = end
                    return
                self._add(0, text[pos:i])
                self._pos = i + len(self.end_token)
                self._state = _CONTENT
                continue
            self._add(1, text[pos:])
            self._pos = n
            return

    def _drain(self) -> tuple[str | None, str | None]:
        reasoning, content = ("".join(part) or None for part in self._out)
        self._out = [[], []]
        return reasoning, content


class DeepSeekR1ReasoningParser(ReasoningParser):
    """``deepseek_r1``: the output starts inside the reasoning (an opening ``<think>`` is optional)."""

    name = "deepseek_r1"
    starts_in_reasoning = True


class Qwen3ReasoningParser(ReasoningParser):
    """``qwen3``: reasoning only if the output opens with ``<think>`` (unless ``think_in_prompt``)."""

    name = "qwen3"

    def __init__(self, *, think_in_prompt: bool = False):
        super().__init__()
        self.think_in_prompt = think_in_prompt

    @property
    def starts_in_reasoning(self) -> bool:  # type: ignore[override]
        return self.think_in_prompt


REASONING_PARSERS: dict[str, type[ReasoningParser]] = {
    "deepseek_r1": DeepSeekR1ReasoningParser,
    "qwen3": Qwen3ReasoningParser,
}


def get_reasoning_parser(name: str) -> type[ReasoningParser]:
    """The reasoning parser class called ``name``; ValueError (listing the choices) for an unknown one."""
    try:
        return REASONING_PARSERS[name]
    except KeyError:
        raise ValueError(f"unknown reasoning parser {name!r}; choose one of: {', '.join(sorted(REASONING_PARSERS))}") from None
