"""Request sets for the benchmarks: random lengths, a local ShareGPT file, or shared prefixes.

Every request carries its prompt (text or token ids) and the exact number of output tokens to
generate, so that every server (and the Hugging Face baseline) does identical work.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Protocol, Sequence


class _Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class BenchRequest:
    """One benchmark request: a prompt (token ids when a tokenizer was given) and its output length."""

    prompt: str | list[int]
    prompt_len: int
    output_len: int


# Common English words: prompts built from them are about one token a word for BPE tokenizers.
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we can has been if more when will would who so no "
    "time people year way day man thing woman life child world school state family student group "
    "country problem hand part place case week company system program question work government number "
    "night point home water room mother area money story fact month lot right study book eye job word "
    "business issue side kind head house service friend father power hour game line end member law car "
    "city community name president team minute idea kid body information back parent face others level"
).split()


def parse_range(text: str) -> tuple[int, int]:
    """``"16:512"`` → (16, 512); ``"128"`` → (128, 128)."""
    lo, _, hi = text.partition(":")
    lo_i, hi_i = int(lo), int(hi or lo)
    if lo_i < 1 or hi_i < lo_i:
        raise ValueError(f"bad length range {text!r}: expected MIN:MAX with 1 <= MIN <= MAX")
    return lo_i, hi_i


def _random_prompt(rng: random.Random, length: int, tokenizer: _Tokenizer | None) -> tuple[str | list[int], int]:
    if tokenizer is None:
        return " ".join(rng.choice(_WORDS) for _ in range(length)), length
    # Exact token lengths: decode random word text, re-encode, and cut to length as token ids.
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenizer.encode(" ".join(rng.choice(_WORDS) for _ in range(length)))
    return ids[:length], length


def random_requests(
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    *,
    seed: int = 0,
    tokenizer: _Tokenizer | None = None,
) -> list[BenchRequest]:
    """Prompts and output lengths drawn uniformly from the given inclusive ranges."""
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        prompt, plen = _random_prompt(rng, rng.randint(*input_len), tokenizer)
        out.append(BenchRequest(prompt, plen, rng.randint(*output_len)))
    return out


def prefix_requests(
    num_prompts: int,
    prefix_len: int,
    num_prefixes: int,
    suffix_len: tuple[int, int],
    output_len: tuple[int, int],
    *,
    seed: int = 0,
    tokenizer: _Tokenizer | None = None,
) -> list[BenchRequest]:
    """Requests sharing one of ``num_prefixes`` system prompts of ``prefix_len`` tokens (RAG/agents)."""
    rng = random.Random(seed)
    prefixes = [_random_prompt(rng, prefix_len, tokenizer)[0] for _ in range(num_prefixes)]
    out = []
    for i in range(num_prompts):
        prefix = prefixes[i % num_prefixes]
        suffix, slen = _random_prompt(rng, rng.randint(*suffix_len), tokenizer)
        prompt = prefix + suffix if isinstance(prefix, list) else f"{prefix} {suffix}"
        out.append(BenchRequest(prompt, prefix_len + slen, rng.randint(*output_len)))
    return out


def sharegpt_requests(
    path: str,
    num_prompts: int,
    *,
    seed: int = 0,
    tokenizer: _Tokenizer | None = None,
    max_output_len: int | None = None,
) -> list[BenchRequest]:
    """The first human turn and the first model turn of each ShareGPT conversation (a local JSON
    file in the usual ``[{"conversations": [{"from", "value"}, ...]}]`` layout): the human turn is the
    prompt, the model turn's length is the output length."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    rng = random.Random(seed)
    rng.shuffle(data)
    out: list[BenchRequest] = []
    for item in data:
        turns = item.get("conversations") or item.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, completion = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
        if not prompt or not completion:
            continue
        if tokenizer is not None:
            plen, olen = len(tokenizer.encode(prompt)), len(tokenizer.encode(completion))
        else:
            plen, olen = len(prompt.split()), len(completion.split())
        if plen < 4 or olen < 4:
            continue
        if max_output_len is not None:
            olen = min(olen, max_output_len)
        out.append(BenchRequest(prompt, plen, olen))
        if len(out) == num_prompts:
            break
    if len(out) < num_prompts:
        raise ValueError(f"{path}: only {len(out)} usable conversations, {num_prompts} requested")
    return out


def sharegpt_like_lengths(num_prompts: int, *, seed: int = 0, mean_in: int = 200, mean_out: int = 180,
                          max_len: int = 1024) -> list[tuple[int, int]]:
    """Input/output lengths shaped like ShareGPT's (log-normal, long-tailed) with the given means,
    for when no ShareGPT file is at hand."""
    import math

    rng = random.Random(seed)
    sigma = 0.9
    lengths = []
    for _ in range(num_prompts):
        i = int(rng.lognormvariate(math.log(mean_in) - sigma**2 / 2, sigma))
        o = int(rng.lognormvariate(math.log(mean_out) - sigma**2 / 2, sigma))
        lengths.append((min(max(i, 4), max_len), min(max(o, 4), max_len)))
    return lengths
