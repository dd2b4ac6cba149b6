"""The sampler's greedy fast path (no logprobs asked) agrees with the general path."""

import torch

from pageant.engine.sampler import SamplingBatch, sample


def _greedy_batch(num_rows: int, num_logprobs) -> SamplingBatch:
    return SamplingBatch(
        temperature=torch.ones(num_rows), greedy=torch.ones(num_rows, dtype=torch.bool), all_greedy=True,
        top_k=None, top_p=None, min_p=None, generators=[], bias=[], masked=[], penalty_rows=None,
        presence=None, frequency=None, repetition=None, output_counts=None, prompt_mask=None,
        num_logprobs=[num_logprobs] * num_rows,
    )


def test_greedy_fast_path_matches_general_path():
    torch.manual_seed(0)
    logits = torch.randn(6, 50) * 3
    fast = sample(logits.clone(), _greedy_batch(6, None))
    general = sample(logits.clone(), _greedy_batch(6, 0))  # logprobs=0 takes the general path
    assert fast.token_ids == general.token_ids == logits.argmax(-1).tolist()
    torch.testing.assert_close(torch.tensor(fast.logprobs), torch.tensor(general.logprobs))
    assert fast.ranks == [None] * 6 and fast.top == [None] * 6
