"""Prompt-lookup (n-gram) proposals: continue the sequence the way it went after the last time its
current ending appeared.

For ``n`` from ``prompt_lookup_max`` down to ``prompt_lookup_min``, the last ``n`` tokens of the
sequence (prompt + output) are searched for earlier in it; at the first ``n`` that matches, the
tokens that followed the most recent earlier match are proposed (up to ``k``). No model runs, so
proposals cost only this search; they pay off on repetitive text (code edits, summaries that quote
the prompt), and are simply rejected elsewhere.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to ``k`` proposed next tokens for ``tokens`` ([num_tokens] int64), or [] when the last
    ``min_n`` tokens appear nowhere before."""
    num = tokens.shape[0]
    if k < 1 or num < min_n + 1:
        return []
    for n in range(min(max_n, num - 1), min_n - 1, -1):
        suffix = tokens[num - n :]  # [n]
        windows = sliding_window_view(tokens[: num - 1], n)  # [num - n, n]: every earlier n-gram
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the token after the most recent earlier occurrence
            return tokens[start : start + k].tolist()
    return []


class NgramProposer:
    """Proposes by prompt lookup (``prompt_lookup_min`` .. ``prompt_lookup_max`` tokens)."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int):
        if not 1 <= prompt_lookup_min <= prompt_lookup_max:
            raise ValueError("prompt_lookup_min must be in [1, prompt_lookup_max]")
        self.min_n = prompt_lookup_min
        self.max_n = prompt_lookup_max

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        return propose_ngram(np.asarray(token_ids, dtype=np.int64), self.min_n, self.max_n, k)
