"""SamplingParams validation: invalid values are rejected with a clear InvalidRequestError."""

import pytest

from pageant.engine import InvalidRequestError, SamplingParams


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"n": 0}, "n must"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"logit_bias": {3: 101}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"ignore_eos": "yes"}, "ignore_eos"),
    ],
)
def test_invalid_values_rejected(kwargs, fragment):
    with pytest.raises(InvalidRequestError, match=fragment):
        SamplingParams(**kwargs)
    assert issubclass(InvalidRequestError, ValueError)


def test_normalisation():
    p = SamplingParams(stop="END", logit_bias={"5": 2, 7: -1.5}, temperature=0)
    assert p.stop == ["END"] and p.stop_strs == ("END",)
    assert p.logit_bias == {5: 2.0, 7: -1.5}
    assert p.greedy and not SamplingParams().greedy
    assert SamplingParams(n=2, best_of=3).num_samples == 3
    assert p.clone(max_tokens=3).max_tokens == 3
    assert SamplingParams(max_tokens=None).max_tokens is None
