"""Incremental detokenization and stop-string handling for one sequence.

Decoding token by token would split multi-byte UTF-8 characters (byte-level BPE) and lose
SentencePiece's leading spaces, so each step decodes a short window ``token_ids[prefix_offset:]``
and compares it with the already-emitted part ``token_ids[prefix_offset:read_offset]``: the new
text is the difference, emitted only once it no longer ends in U+FFFD (an incomplete character).
"""

from __future__ import annotations

from pageant.engine.sequence import Sequence
from pageant.engine.tokenizer import Tokenizer


def detokenize_incrementally(tokenizer: Tokenizer, seq: Sequence, skip_special_tokens: bool) -> str:
    """Append the text of ``seq``'s newest token(s) to ``seq.text``; return the new text."""
    ids = seq.token_ids
    prefix_text = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens)
    new_text = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens)
    if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
        return ""  # nothing new yet, or an incomplete UTF-8 sequence: wait for more tokens
    delta = new_text[len(prefix_text) :]
    seq.prefix_offset = seq.read_offset
    seq.read_offset = len(ids)
    seq.text += delta
    return delta


def find_stop_string(text: str, num_new_chars: int, stops: tuple[str, ...]) -> tuple[str, int] | None:
    """The earliest stop string that ends within the last ``num_new_chars`` characters of
    ``text``: ``(stop, start_index)``, or None."""
    best: tuple[str, int] | None = None
    for stop in stops:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        idx = text.find(stop, start)
        if idx != -1 and (best is None or idx < best[1]):
            best = (stop, idx)
    return best


def held_back_chars(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string
    (it may still become a stop string, so it is not shown yet)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-k:]):
                longest = k
                break
    return longest
