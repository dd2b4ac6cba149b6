"""Beam search on top of the engine, scored exactly as Hugging Face ``generate(num_beams=k)``.

Each step expands every live beam by one token: the beam's tokens go to the engine as a request
for one token with the top ``2 * beam_width`` logprobs (``log_softmax`` of the raw logits, as
transformers scores beams). With prefix caching on, the beams of a prompt share the KV blocks of
their common prefix through the cache's reference counts and only each beam's last, partial block
is recomputed (vLLM's design); without it every step re-prefills each beam.

The selection follows transformers' vectorised beam search (``GenerationMixin._beam_search``,
``early_stopping=False``): the top ``max(2, 1 + n_eos) * beam_width`` continuations by cumulative
logprob; those ending in EOS or at ``max_tokens`` that rank within the top ``beam_width`` become
finished hypotheses scored ``cum_logprob / generated_len ** length_penalty``; the best
``beam_width`` unfinished continuations run on; the search stops once no running beam can beat the
worst of ``beam_width`` finished ones (its score at the current length), or nothing can continue.
Scores accumulate in float32, as transformers' do, so near-ties break the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pageant.engine.sampling_params import MAX_LOGPROBS

DEAD = np.float32(-1.0e9)  # transformers' score for an impossible beam
MAX_BEAM_WIDTH = 10  # max(2, 1 + n_eos) * beam_width logprobs per step must stay within MAX_LOGPROBS


@dataclass(frozen=True)
class BeamSearchParams:
    """vLLM's beam-search parameters. ``temperature`` must be 0 (deterministic beams)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.beam_width, bool) or not isinstance(self.beam_width, int) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be an integer in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature != 0.0:
            raise ValueError("beam search is deterministic: temperature must be 0")
        if not isinstance(self.length_penalty, (int, float)) or isinstance(self.length_penalty, bool):
            raise ValueError(f"length_penalty must be a number, got {self.length_penalty!r}")


@dataclass
class BeamSearchSequence:
    """One hypothesis: all its tokens (prompt + generated), their logprobs, the cumulative logprob
    and the length-penalised score it is ranked by."""

    tokens: list[int]
    logprobs: list[float] = field(default_factory=list)
    cum_logprob: float = 0.0
    score: float = 0.0
    text: str | None = None
    finish_reason: str | None = None


@dataclass
class BeamSearchOutput:
    """The hypotheses of one prompt, best first (at most ``beam_width``)."""

    sequences: list[BeamSearchSequence]


class BeamSearch:
    """The beams of one prompt. ``live()`` lists the beams to expand this step; ``advance`` takes,
    per live beam, its top continuations ``{token: logprob}``; ``done`` ends the search."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: frozenset[int]):
        self.params = params
        self.num_prompt_tokens = len(prompt_token_ids)
        self.eos = frozenset() if params.ignore_eos else frozenset(eos_token_ids)
        self.beams_to_keep = max(2, 1 + len(self.eos)) * params.beam_width
        if self.beams_to_keep > MAX_LOGPROBS:
            raise ValueError(f"beam_width {params.beam_width} with {len(self.eos)} EOS tokens needs "
                             f"{self.beams_to_keep} candidates per beam; at most {MAX_LOGPROBS} are available")
        self.running = [BeamSearchSequence(list(prompt_token_ids))]
        self.running_scores = [np.float32(0.0)]
        self.finished: list[tuple[np.float32, BeamSearchSequence]] = []  # at most beam_width, best first
        self.done = False
        self._unsatisfied = True  # transformers' is_early_stop_heuristic_unsatisfied

    @property
    def num_generated(self) -> int:
        return len(self.running[0].tokens) - self.num_prompt_tokens

    def live(self) -> list[BeamSearchSequence]:
        """The beams worth expanding (beams scored as impossible are dropped: their continuations
        can never be among the top ones while the vocabulary has more than ``beams_to_keep`` tokens)."""
        return [b for b, s in zip(self.running, self.running_scores) if s > DEAD / 2]

    def advance(self, continuations: list[dict[int, float]]) -> None:
        """One step: ``continuations[i]`` are the top tokens of ``live()[i]`` with their logprobs."""
        p, width = self.params, self.params.beam_width
        scores = [s for s in self.running_scores if s > DEAD / 2]
        cands = []  # (accumulated float32 score, beam index, token, token logprob)
        for i, (beam_score, top) in enumerate(zip(scores, continuations)):
            for token, lp in top.items():
                cands.append((np.float32(beam_score + np.float32(lp)), i, token, float(lp)))
        cands.sort(key=lambda c: (-c[0], c[1], c[2]))
        cands = cands[: self.beams_to_keep]
        last_step = self.num_generated + 1 >= p.max_tokens
        hits = [last_step or c[2] in self.eos for c in cands]
        beams = self.live()

        def extend(c) -> BeamSearchSequence:
            parent = beams[c[1]]
            return BeamSearchSequence(parent.tokens + [c[2]], parent.logprobs + [c[3]], float(c[0]))

        # finished hypotheses: hits ranked within the top beam_width, length-penalised
        length = np.float32((self.num_generated + 1) ** p.length_penalty)
        merged = list(self.finished)
        if self._unsatisfied:
            for rank, (c, hit) in enumerate(zip(cands, hits)):
                if hit and rank < width:
                    seq = extend(c)
                    seq.score = float(np.float32(c[0] / length))
                    seq.finish_reason = "length" if c[2] not in self.eos else "stop"
                    merged.append((np.float32(seq.score), seq))
        merged.sort(key=lambda item: -item[0])  # stable: earlier (older) hypotheses win ties
        self.finished = merged[:width]
        # the best beam_width unfinished continuations run on (finished ones count as impossible)
        running = sorted(((np.float32(c[0] + DEAD) if hit else c[0], n) for n, (c, hit) in enumerate(zip(cands, hits))),
                         key=lambda item: (-item[0], item[1]))[:width]
        self.running = [extend(cands[n]) for _, n in running]
        self.running_scores = [s for s, _ in running]
        # transformers' early-stop heuristic (early_stopping=False): the best running beam at the
        # current length against the worst finished one, once beam_width hypotheses are finished
        best_possible = self.running_scores[0] / np.float32((self.num_generated) ** p.length_penalty)
        if len(self.finished) == width:
            worst = min(s for s, _ in self.finished)
            self._unsatisfied = self._unsatisfied and bool(best_possible > worst)
        self.done = not self._unsatisfied or all(hits) or not self.live()

    def output(self) -> BeamSearchOutput:
        """The finished hypotheses, best first."""
        return BeamSearchOutput([seq for _, seq in self.finished])
