"""Engine logprobs → OpenAI's two logprob shapes (completions and chat)."""

from __future__ import annotations

from pageant.engine.outputs import CompletionOutput, Logprob
from pageant.engine.server import protocol as p


def _top(entries: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    ranked = sorted(entries.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                     -kv[1].logprob))
    return [(tid, lp) for tid, lp in ranked if lp.rank is None or lp.rank <= k][:k]


def _token_text(tok, token_id: int, lp: Logprob | None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tok.token_str(token_id)


def _entries(c: CompletionOutput, start: int):
    logprobs = c.logprobs or []
    for i in range(start, min(len(c.token_ids), len(logprobs))):
        yield c.token_ids[i], logprobs[i] or {}


def text_logprobs_for_stream(c: CompletionOutput, tok, k: int, start: int, text_offset: int) -> p.CompletionLogprobs:
    """Completions-style logprobs of tokens ``start:`` (offsets counted from ``text_offset``)."""
    out = p.CompletionLogprobs()
    offset = text_offset
    for token_id, entries in _entries(c, start):
        chosen = entries.get(token_id)
        text = _token_text(tok, token_id, chosen)
        out.tokens.append(text)
        out.token_logprobs.append(None if chosen is None else chosen.logprob)
        out.text_offset.append(offset)
        offset += len(text)
        top = {_token_text(tok, tid, lp): lp.logprob for tid, lp in _top(entries, k)}
        if chosen is not None:
            top.setdefault(text, chosen.logprob)
        out.top_logprobs.append(top)
    return out


def completion_logprobs(c: CompletionOutput, tok, k: int) -> p.CompletionLogprobs:
    return text_logprobs_for_stream(c, tok, k, 0, 0)


def chat_logprobs(c: CompletionOutput, tok, k: int, start: int) -> p.ChatLogprobs:
    """Chat-style logprobs (``{"content": [...]}``) of tokens ``start:``."""
    content = []
    for token_id, entries in _entries(c, start):
        chosen = entries.get(token_id)
        text = _token_text(tok, token_id, chosen)
        top = [p.TopLogprob(token=_token_text(tok, tid, lp), logprob=lp.logprob,
                            bytes=list(_token_text(tok, tid, lp).encode()))
               for tid, lp in _top(entries, k)]
        content.append(p.ChatTokenLogprob(token=text, logprob=-9999.0 if chosen is None else chosen.logprob,
                                          bytes=list(text.encode()), top_logprobs=top))
    return p.ChatLogprobs(content=content)
