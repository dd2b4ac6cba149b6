"""Speculative decoding's pure parts: the rejection sampler follows the target distribution (chi-
square over many draws, for random target and draft distributions and for one-hot proposals), the
greedy rule, n-gram lookup, and ``speculative_config`` validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pageant.engine.spec_decode.config import SpeculativeConfig
from pageant.engine.spec_decode.metrics import SpecDecodingStats
from pageant.engine.spec_decode.ngram import propose_ngram
from pageant.engine.spec_decode.rejection_sampler import rejection_sample

VOCAB, K, DRAWS = 8, 2, 60_000


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed ``counts`` under ``probs`` (cells with expected count > 0)."""
    n = counts.sum()
    expected = probs * n
    keep = expected > 0
    if (counts[~keep] > 0).any():
        return 0.0
    stat = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def run_sampler(gen: torch.Generator, one_hot: bool):
    """Many rows of one fixed (target, draft) pair: the target probs, and what each row emitted."""
    p = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.7)).sample((K + 1,))  # [K + 1, vocab]
    p[0, 3] = 0.0  # a token the target never emits
    p = p / p.sum(-1, keepdim=True)
    q = torch.distributions.Dirichlet(torch.full((VOCAB,), 0.7)).sample((K,))  # [K, vocab]
    if one_hot:  # deterministic proposals (n-gram): always the same tokens
        draft = torch.tensor([[1, 5]]).expand(DRAWS, K)
        draft_probs = None
    else:
        draft = torch.stack([torch.multinomial(q[j], DRAWS, replacement=True, generator=gen) for j in range(K)], 1)
        draft_probs = q[None].expand(DRAWS, K, VOCAB)
    target = p[None].expand(DRAWS, K + 1, VOCAB)
    uniform = torch.rand(DRAWS, K, generator=gen)
    noise = torch.empty(DRAWS, VOCAB).exponential_(generator=gen)
    greedy = torch.zeros(DRAWS, dtype=torch.bool)
    num_acc, final = rejection_sample(target, target.argmax(-1), draft, torch.full((DRAWS,), K), greedy, uniform,
                                      noise, draft_probs)
    first = torch.where(num_acc > 0, draft[:, 0], final)
    second = torch.where(num_acc > 1, draft[:, 1], final)  # meaningful where the first was accepted
    return p, draft, num_acc, first, second


@pytest.mark.parametrize("one_hot", [False, True])
def test_emitted_tokens_follow_the_target_distribution(one_hot):
    gen = torch.Generator().manual_seed(1234)
    torch.manual_seed(99)
    for _ in range(3):  # several random (target, draft) pairs
        p, draft, num_acc, first, second = run_sampler(gen, one_hot)
        counts = torch.bincount(first, minlength=VOCAB).double()
        assert chi_square_p(counts, p[0].double()) > 1e-3
        assert counts[3] == 0  # never a token the target gives probability 0
        given = num_acc > 0  # after an accepted first token, the second follows p_1
        counts2 = torch.bincount(second[given], minlength=VOCAB).double()
        assert chi_square_p(counts2, p[1].double()) > 1e-3
        if not one_hot:  # the test has power: the draft's own tokens do not pass it
            assert chi_square_p(torch.bincount(draft[:, 0], minlength=VOCAB).double(), p[0].double()) < 1e-6


def test_acceptance_rate_matches_theory():
    """Leviathan et al.: a proposal from q is accepted with probability sum_x min(p(x), q(x))."""
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(5)
    p, draft, num_acc, _, _ = run_sampler(gen, one_hot=False)
    # recompute q as drawn in run_sampler: the empirical acceptance of position 0 against theory
    accepted = (num_acc > 0).double().mean().item()
    q0 = torch.bincount(draft[:, 0], minlength=VOCAB).double() / DRAWS
    theory = torch.minimum(p[0].double(), q0).sum().item()
    assert abs(accepted - theory) < 0.02


def test_greedy_rows_accept_the_argmax_prefix():
    argmax = torch.tensor([[4, 6, 1], [4, 6, 1], [2, 2, 2]])
    draft = torch.tensor([[4, 6], [4, 5], [3, 2]])
    greedy = torch.ones(3, dtype=torch.bool)
    num_acc, final = rejection_sample(None, argmax, draft, torch.tensor([2, 2, 1]), greedy, None, None)
    assert num_acc.tolist() == [2, 1, 0]
    assert final.tolist() == [1, 6, 2]
    # the same through the mixed path (probabilities given): greedy rows ignore them
    probs = torch.full((3, 3, VOCAB), 1.0 / VOCAB)
    num_acc2, final2 = rejection_sample(probs, argmax, draft, torch.tensor([2, 2, 1]), greedy,
                                        torch.rand(3, 2), torch.ones(3, VOCAB))
    assert num_acc2.tolist() == [2, 1, 0] and final2.tolist() == [1, 6, 2]


def test_ngram_lookup():
    tokens = np.array([1, 2, 3, 4, 1, 2, 3, 5, 6, 1, 2, 3])
    assert propose_ngram(tokens, 2, 3, 2) == [5, 6]  # the most recent earlier "1 2 3" was followed by 5 6
    assert propose_ngram(tokens, 1, 1, 3) == [5, 6, 1]
    assert propose_ngram(np.array([1, 2, 3, 4]), 1, 3, 2) == []
    assert propose_ngram(np.array([7, 7, 7, 7]), 2, 2, 5) == [7]  # only what exists after the match
    assert propose_ngram(tokens, 2, 3, 0) == []


@pytest.mark.parametrize("raw, message", [
    ({"method": "ngram"}, "num_speculative_tokens"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 2, "bogus": 1}, "unknown key"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2}, "<="),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "needs a 'model'"),
    ({"num_speculative_tokens": 2}, "needs a method"),
    ({"model": "x", "num_speculative_tokens": 2, "prompt_lookup_max": 3}, "ngram' only"),
    ("ngram", "must be a dict"),
])
def test_config_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeConfig.from_dict(raw)


def test_config_defaults():
    c = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4})
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (4, 4)
    c = SpeculativeConfig.from_dict({"model": "/some/draft", "num_speculative_tokens": 3, "disable_by_batch_size": 4})
    assert c.method == "draft_model" and c.disable_by_batch_size == 4


def test_stats_counters():
    s = SpecDecodingStats(3)
    s.observe(3, 2)
    s.observe(2, 0)
    s.observe(0, 0)  # no proposals: not a draft
    assert s.as_dict() == {"spec_decode_num_drafts": 2, "spec_decode_num_draft_tokens": 5,
                           "spec_decode_num_accepted_tokens": 2, "spec_decode_num_accepted_tokens_per_pos": [1, 1, 0]}
    assert s.acceptance_rate == pytest.approx(0.4) and s.mean_acceptance_length == pytest.approx(2.0)
