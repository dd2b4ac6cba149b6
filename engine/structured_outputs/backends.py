"""Grammar backends: xgrammar (default) and llguidance, behind one small interface.

``compile(params)`` turns a constraint into a backend grammar (raising ``ValueError`` with the
backend's message for a bad one); ``matcher(compiled)`` makes the per-sequence state with
``fill(bitmask, row)``, ``accept(token) -> bool`` and ``terminated``. Bitmasks are xgrammar's and
llguidance's shared layout: int32 ``[rows, ceil(vocab / 32)]``, bit ``t % 32`` of word ``t // 32``
set when token ``t`` is allowed.
"""

from __future__ import annotations

import json
import re

import torch

from pageant.engine.structured_outputs.params import StructuredOutputsParams


def choice_regex(choices) -> str:
    """A regex matching exactly one of the literal ``choices``."""
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


class XGrammarBackend:
    """xgrammar: JSON schema, JSON object, regex, choice, EBNF grammar, structural tag.

    xgrammar's JSON strings admit raw control characters (it excludes only CR and LF), which strict
    JSON parsers (Python's ``json.loads``) reject; JSON matchers therefore also mask every token
    holding a control byte other than CR/LF (so tabs never appear, spaces and newlines still may).
    """

    name = "xgrammar"

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import numpy as np
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True)
        control = bytes(b for b in range(0x20) if b not in (0x0A, 0x0D))
        words = np.full((vocab_size + 31) // 32, 0xFFFFFFFF, dtype=np.uint32)
        for token, text in enumerate(info.decoded_vocab[:vocab_size]):
            if any(b in control for b in text):
                words[token // 32] &= ~np.uint32(1 << (token % 32))
        self.strict_json_words = torch.from_numpy(words.view(np.int32).copy())  # [ceil(vocab / 32)] int32

    def compile(self, params: StructuredOutputsParams):
        c, kind, ws = self.compiler, params.kind, not params.disable_any_whitespace
        try:
            if kind == "json":
                return c.compile_json_schema(params.spec, any_whitespace=ws)
            if kind == "json_object":  # OpenAI's json_object mode: an object (the builtin grammar is any value)
                return c.compile_json_schema(json.dumps({"type": "object"}), any_whitespace=ws)
            if kind == "regex":
                return c.compile_regex(params.regex)
            if kind == "choice":
                return c.compile_regex(choice_regex(params.choice))
            if kind == "grammar":
                return c.compile_grammar(params.grammar)
            tag = json.loads(params.structural_tag)
            if isinstance(tag, dict) and "structures" in tag:  # vLLM's older {"structures", "triggers"} form
                items = [self.xgr.StructuralTagItem(begin=t["begin"], schema=json.dumps(t.get("schema", {})),
                                                    end=t["end"]) for t in tag["structures"]]
                return c.compile_structural_tag(items, tag.get("triggers", []))
            return c.compile_structural_tag(params.structural_tag)
        except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses with its message
            raise ValueError(f"invalid {kind} for structured outputs (xgrammar): {exc}") from None

    def matcher(self, compiled, params: StructuredOutputsParams) -> "XGrammarMatcher":
        strict = self.strict_json_words if params.kind in ("json", "json_object") else None
        return XGrammarMatcher(self.xgr.GrammarMatcher(compiled), strict)


class XGrammarMatcher:
    def __init__(self, matcher, extra_words: torch.Tensor | None = None):
        self.m, self.extra = matcher, extra_words

    def fill(self, bitmask, row: int) -> None:
        self.m.fill_next_token_bitmask(bitmask, row)
        if self.extra is not None:
            bitmask[row] &= self.extra

    def accept(self, token: int) -> bool:
        return self.m.accept_token(token)

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.m.rollback(num_tokens)

    @property
    def terminated(self) -> bool:
        return self.m.is_terminated()


class GuidanceBackend:
    """llguidance: JSON schema, JSON object, regex, choice, Lark grammar (EBNF converted by it)."""

    name = "guidance"

    def __init__(self, hf_tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size, eos_token=stop_token_ids[0])

    def compile(self, params: StructuredOutputsParams):
        M, kind = self.ll.LLMatcher, params.kind
        defaults = {"whitespace_flexible": not params.disable_any_whitespace}
        if kind == "json":
            grammar = M.grammar_from_json_schema(params.spec, defaults=defaults)
        elif kind == "json_object":
            grammar = M.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=defaults)
        elif kind in ("regex", "choice"):
            grammar = M.grammar_from_regex(params.regex if kind == "regex" else choice_regex(params.choice))
        elif kind == "grammar":
            grammar = M.grammar_from_lark(params.grammar)
        else:
            raise ValueError("the guidance backend does not support structural_tag; use xgrammar")
        is_error, messages = M.validate_grammar_with_warnings(grammar)
        if is_error:
            raise ValueError(f"invalid {kind} for structured outputs (guidance): {'; '.join(messages).strip()}")
        return grammar

    def matcher(self, compiled, params: StructuredOutputsParams) -> "GuidanceMatcher":
        m = self.ll.LLMatcher(self.tokenizer, compiled)
        if m.is_error():
            raise ValueError(f"structured outputs (guidance): {m.get_error()}")
        return GuidanceMatcher(m)


class GuidanceMatcher:
    def __init__(self, matcher):
        import llguidance.torch

        self.m, self._fill = matcher, llguidance.torch.fill_next_token_bitmask

    def fill(self, bitmask, row: int) -> None:
        self._fill(self.m, bitmask, row)

    def accept(self, token: int) -> bool:
        return bool(self.m.consume_token(token))

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.m.rollback(num_tokens)

    @property
    def terminated(self) -> bool:
        return self.m.is_stopped()


BACKENDS = {"xgrammar": XGrammarBackend, "guidance": GuidanceBackend}
