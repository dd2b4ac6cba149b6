"""The sampler on its own: distributions against their definitions, penalties and logit_bias
against a hand computation, seeded rows independent of the batch."""

from __future__ import annotations

import math

import pytest
import torch

from pageant.engine.outputs import RequestMetrics
from pageant.engine.sampler import SamplingBatch, apply_processors, sample, truncated_probs
from pageant.engine.sampling_params import SamplingParams
from pageant.engine.sequence import Request, make_generator

VOCAB = 8
LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


def seqs_for(params: SamplingParams, count: int, prompt=(1, 3), output=()):
    out = []
    for i in range(count):
        req = Request(request_id=f"r{i}", prompt=None, prompt_token_ids=list(prompt), params=params,
                      priority=0, metrics=RequestMetrics(0.0), eos_token_ids=frozenset({2}))
        seq = req.new_sequence(0, list(prompt) + list(output), make_generator(params.seed, 0, torch.device("cpu")))
        out.append(seq)
    return out


def empirical(params: SamplingParams, rows: int = 6000, seed: int = 0) -> torch.Tensor:
    seqs = seqs_for(params, rows)
    batch = SamplingBatch.build(seqs, VOCAB, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    tokens = sample(LOGITS.repeat(rows, 1), batch, gen).token_ids
    return torch.bincount(torch.tensor(tokens), minlength=VOCAB).float() / rows


def expected_probs(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> torch.Tensor:
    """Straight from the definitions, one token at a time."""
    p = torch.softmax(LOGITS / temperature, dim=0)
    order = sorted(range(VOCAB), key=lambda i: -p[i].item())
    keep = set(order[:top_k] if top_k > 0 else order)
    mass = 0.0
    nucleus = set()
    for i in order:
        if i in keep and mass < top_p:
            nucleus.add(i)
            mass += p[i].item() / sum(p[j].item() for j in keep)
    keep &= nucleus
    q = torch.tensor([p[i].item() if i in keep else 0.0 for i in range(VOCAB)])
    q = q / q.sum()
    if min_p > 0:
        q = torch.where(q >= min_p * q.max(), q, torch.zeros_like(q))
        q = q / q.sum()
    return q


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=1.0),
        dict(temperature=0.5),
        dict(temperature=1.0, top_k=3),
        dict(temperature=1.0, top_p=0.6),
        dict(temperature=1.0, min_p=0.2),
        dict(temperature=0.8, top_k=5, top_p=0.9),
    ],
)
def test_distribution_matches_definition(kwargs):
    expected = expected_probs(**kwargs)
    exact = truncated_probs(LOGITS[None].clone(), SamplingBatch.build(seqs_for(SamplingParams(**kwargs), 1), VOCAB, torch.device("cpu")))[0]
    assert torch.allclose(exact, expected, atol=1e-6)
    got = empirical(SamplingParams(**kwargs))
    assert torch.all(got[expected == 0] == 0), "a truncated token was sampled"
    # 6000 draws: the standard error of each frequency is below 0.007
    assert (got - expected).abs().max() < 0.03, (got, expected)


def test_greedy_and_mixed_batch():
    greedy = seqs_for(SamplingParams(temperature=0), 2)
    random = seqs_for(SamplingParams(temperature=1.0, top_k=1), 2)
    batch = SamplingBatch.build(greedy + random, VOCAB, torch.device("cpu"))
    out = sample(LOGITS.repeat(4, 1), batch, torch.Generator().manual_seed(0))
    assert out.token_ids == [0, 0, 0, 0]
    assert math.isclose(out.logprobs[0], torch.log_softmax(LOGITS, 0)[0].item(), rel_tol=1e-6)


def test_seeded_rows_do_not_depend_on_the_batch():
    params = SamplingParams(temperature=1.0, seed=42)

    def draw(extra_rows: int, position: int) -> list[int]:
        seq = seqs_for(params, 1)[0]
        others = seqs_for(SamplingParams(temperature=1.0), extra_rows)
        rows = others[:position] + [seq] + others[position:]
        tokens = []
        for step in range(20):
            batch = SamplingBatch.build(rows, VOCAB, torch.device("cpu"))
            out = sample(LOGITS.repeat(len(rows), 1), batch, torch.Generator().manual_seed(step + extra_rows))
            tokens.append(out.token_ids[position])
        return tokens

    alone = draw(0, 0)
    assert draw(5, 2) == alone and draw(9, 9) == alone
    assert len(set(alone)) > 1  # it really samples


def test_penalties_and_logit_bias_by_hand():
    params = SamplingParams(temperature=0, repetition_penalty=2.0, presence_penalty=0.5,
                            frequency_penalty=0.25, logit_bias={7: 3.0, 0: -1.0})
    # prompt has tokens 1, 3; output so far: 4, 4, 6
    seq = seqs_for(params, 1, prompt=(1, 3), output=(4, 4, 6))[0]
    batch = SamplingBatch.build([seq], VOCAB, torch.device("cpu"))
    got = apply_processors(LOGITS[None].clone(), batch)[0]
    expected = LOGITS.clone()
    expected[7] += 3.0
    expected[0] += -1.0
    counts = {4: 2, 6: 1}
    for t in range(VOCAB):
        if t in (1, 3) or t in counts:  # repetition: prompt and output tokens
            expected[t] = expected[t] / 2.0 if expected[t] > 0 else expected[t] * 2.0
        if t in counts:
            expected[t] -= 0.25 * counts[t] + 0.5
    assert torch.allclose(got, expected), (got, expected)


def test_min_tokens_masks_eos_and_stop_ids():
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[5], logit_bias={2: 100, 5: 100})
    early = seqs_for(params, 1, output=(4,))[0]
    late = seqs_for(params, 1, output=(4, 4, 4))[0]
    out = sample(LOGITS.repeat(2, 1), SamplingBatch.build([early, late], VOCAB, torch.device("cpu")))
    assert out.token_ids[0] not in (2, 5) and out.token_ids[1] in (2, 5)


def test_logprobs_and_ranks():
    seq = seqs_for(SamplingParams(temperature=0, logprobs=3), 1)[0]
    out = sample(LOGITS[None].clone(), SamplingBatch.build([seq], VOCAB, torch.device("cpu")))
    lp = torch.log_softmax(LOGITS, 0)
    ids, vals = out.top[0]
    assert ids == [0, 1, 2] and torch.allclose(torch.tensor(vals), lp[:3])
    assert out.ranks[0] == 1
