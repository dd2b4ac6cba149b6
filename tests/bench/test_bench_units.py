"""Unit tests of the benchmark pieces that need no model: datasets, arrivals, statistics."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from pageant.engine.bench import datasets
from pageant.engine.bench.serve import RequestResult, arrival_intervals, format_summary, summarize


def test_parse_range():
    assert datasets.parse_range("16:512") == (16, 512)
    assert datasets.parse_range("7") == (7, 7)
    for bad in ("0:5", "9:3", "x"):
        with pytest.raises(ValueError):
            datasets.parse_range(bad)


def test_random_requests_respect_ranges_and_seed():
    a = datasets.random_requests(50, (3, 9), (2, 5), seed=1)
    b = datasets.random_requests(50, (3, 9), (2, 5), seed=1)
    assert a == b
    assert all(3 <= r.prompt_len <= 9 and 2 <= r.output_len <= 5 for r in a)
    assert all(len(r.prompt.split()) == r.prompt_len for r in a)
    assert len({r.prompt_len for r in a}) > 3


class _ByteTokenizer:
    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


def test_exact_token_lengths_with_a_tokenizer():
    reqs = datasets.random_requests(10, (5, 40), (1, 2), seed=0, tokenizer=_ByteTokenizer())
    assert all(isinstance(r.prompt, list) and len(r.prompt) == r.prompt_len for r in reqs)


def test_prefix_requests_share_their_prefixes():
    tok = _ByteTokenizer()
    reqs = datasets.prefix_requests(12, 30, 3, (2, 6), (1, 3), seed=0, tokenizer=tok)
    prefixes = {tuple(r.prompt[:30]) for r in reqs}
    assert len(prefixes) == 3
    assert all(30 + 2 <= r.prompt_len <= 30 + 6 for r in reqs)


def test_sharegpt_file(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "one two three four five"},
                           {"from": "gpt", "value": "a b c d e f g"}]},
        {"conversations": [{"from": "human", "value": "too short"}]},
        {"conversations": [{"from": "human", "value": "w x y z w x"},
                           {"from": "gpt", "value": "q r s t u v w x y z"}]},
    ]
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(data))
    reqs = datasets.sharegpt_requests(str(path), 2, seed=0, max_output_len=8)
    assert sorted(r.output_len for r in reqs) == [7, 8]
    with pytest.raises(ValueError, match="only 2 usable"):
        datasets.sharegpt_requests(str(path), 3)


def test_sharegpt_like_lengths_have_the_asked_means():
    lengths = datasets.sharegpt_like_lengths(4000, seed=0, max_len=100_000)
    assert abs(statistics.mean(i for i, _ in lengths) - 200) < 20
    assert abs(statistics.mean(o for _, o in lengths) - 180) < 18


@pytest.mark.parametrize("burstiness", [1.0, 0.5, 4.0])
def test_arrivals_are_gamma_with_mean_one_over_rate(burstiness):
    gaps = arrival_intervals(20001, 8.0, burstiness, random.Random(0))[1:]
    assert abs(statistics.mean(gaps) - 1 / 8.0) < 0.01
    # coefficient of variation of a gamma(k) is 1/sqrt(k): burstier arrivals vary more
    cv = statistics.pstdev(gaps) / statistics.mean(gaps)
    assert abs(cv - burstiness ** -0.5) < 0.06
    assert arrival_intervals(5, float("inf"), 1.0, random.Random(0)) == [0.0] * 5
    with pytest.raises(ValueError):
        arrival_intervals(5, 0.0, 1.0, random.Random(0))


def test_summarize_by_hand():
    ok1 = RequestResult(10, 4, success=True, ttft=0.1, latency=0.4, output_tokens=4, prompt_tokens=10,
                        itl=[0.1, 0.1, 0.1], chunk_times=[0.1, 0.2, 0.3, 0.4])
    ok2 = RequestResult(20, 3, success=True, ttft=0.3, latency=0.5, output_tokens=3, prompt_tokens=20,
                        itl=[0.1, 0.1], chunk_times=[0.3, 0.4, 0.5])
    bad = RequestResult(5, 3, success=False, error="HTTP 429: busy")
    s = summarize([ok1, ok2, bad], duration=2.0)
    assert s["completed"] == 2 and s["failed"] == 1 and s["errors"] == ["HTTP 429: busy"]
    assert s["total_output_tokens"] == 7 and s["total_input_tokens"] == 30
    assert s["output_throughput"] == pytest.approx(3.5)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200.0)
    assert s["ttft_ms"]["median"] == pytest.approx(200.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(100.0)  # (0.4-0.1)/3 and (0.5-0.3)/2
    assert s["e2e_ms"]["p99"] == pytest.approx(499.0)
    text = format_summary(s)
    assert "Successful requests:" in text and "Mean TTFT (ms):" in text
