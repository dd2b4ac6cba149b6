"""Stop conditions are capped (number and total length of stop strings, number of stop token ids),
and matching them after each token reads a window bounded by the longest stop string."""

from __future__ import annotations

import random

import pytest

from pageant.engine.detokenizer import find_stop_string, held_back_chars, stop_search_start
from pageant.engine.sampling_params import DEFAULT_STOP_LIMITS, SamplingParams, StopLimits


# ---------------------------------------------------------------------------- limits
def test_default_limits():
    assert (DEFAULT_STOP_LIMITS.max_stop_strings, DEFAULT_STOP_LIMITS.max_stop_chars,
            DEFAULT_STOP_LIMITS.max_stop_token_ids) == (64, 4096, 256)
    SamplingParams(stop=[f"s{i}" for i in range(64)])
    SamplingParams(stop=["x" * 4096])
    SamplingParams(stop_token_ids=list(range(256)))


@pytest.mark.parametrize("kwargs, words", [
    ({"stop": [f"s{i}" for i in range(65)]}, "at most 64 stop strings"),
    ({"stop": ["x" * 1024] * 5}, "at most 4096 characters"),
    ({"stop": "y" * 4097}, "at most 4096 characters"),
    ({"stop_token_ids": list(range(257))}, "at most 256 stop token ids"),
])
def test_over_the_limits_is_a_value_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        SamplingParams(**kwargs)


def test_limits_are_configurable_and_survive_clone():
    limits = StopLimits(max_stop_strings=2, max_stop_chars=10, max_stop_token_ids=1)
    with pytest.raises(ValueError, match="at most 2 stop strings"):
        SamplingParams(stop=["a", "b", "c"], stop_limits=limits)
    with pytest.raises(ValueError, match="at most 10 characters"):
        SamplingParams(stop=["abcdef", "ghijk"], stop_limits=limits)
    with pytest.raises(ValueError, match="at most 1 stop token ids"):
        SamplingParams(stop_token_ids=[1, 2], stop_limits=limits)
    p = SamplingParams(stop=["ab", "cde"], stop_limits=limits)
    assert p.max_stop_len == 3
    with pytest.raises(ValueError, match="at most 2 stop strings"):
        p.clone(stop=["a", "b", "c"])
    wide = StopLimits(max_stop_strings=1000, max_stop_chars=10**6)
    assert len(SamplingParams(stop=["z" * 100] * 1000, stop_limits=wide).stop_strs) == 1000


# ---------------------------------------------------------------------------- bounded window
class _WatchedText(str):
    """A text that records the slices taken of it and fails any search over all of it."""

    def __new__(cls, value):
        obj = super().__new__(cls, value)
        obj.slices = []
        return obj

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, _ = key.indices(len(self))
            self.slices.append(stop - start)
        return str.__getitem__(self, key)

    def _whole_scan(self, *args, **kwargs):
        raise AssertionError("the whole text was searched")

    find = rfind = index = rindex = count = startswith = endswith = __contains__ = _whole_scan


def test_search_reads_only_new_text_plus_longest_stop():
    stops = ("never-here", "STOP", "x" * 50)
    longest = 50
    for new in (1, 3, 17):
        text = _WatchedText("lorem ipsum " * 100_000 + "abc"[:new] + "q" * max(0, new - 3))
        assert find_stop_string(text, new, stops, longest) is None
        assert text.slices and max(text.slices) <= new + longest - 1
        held = _WatchedText(str(text) + "ST")
        assert held_back_chars(held, stops, longest) == 2
        assert held.slices and max(held.slices) <= longest - 1
    assert stop_search_start(10**6, 5, 50) == 10**6 - 54
    assert stop_search_start(10, 5, 50) == 0


def test_hit_positions_are_in_the_whole_texts_coordinates():
    text = "a" * 10_000 + "xxSTOPyy"
    assert find_stop_string(text, 3, ("STOP",)) == ("STOP", 10_002)  # ends inside the new "Pyy"
    assert find_stop_string(text, 2, ("STOP",)) is None  # ended before the new "yy"
    assert find_stop_string(text, 3, ("STOP", "OPy")) == ("STOP", 10_002)  # earliest start wins


def _reference_hit(text: str, num_new: int, stops) -> tuple[str, int] | None:
    best = None
    for stop in stops:
        start = 0
        while (idx := text.find(stop, start)) != -1:
            if idx + len(stop) > len(text) - num_new:
                if best is None or idx < best[1]:
                    best = (stop, idx)
                break
            start = idx + 1
    return best


def _reference_held(text: str, stops) -> int:
    return max((k for stop in stops for k in range(1, min(len(stop) - 1, len(text)) + 1)
                if stop.startswith(text[-k:])), default=0)


def test_window_search_equals_a_whole_text_search():
    rng = random.Random(0)
    alphabet = "ab c"
    for _ in range(400):
        stops = tuple({"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 7))) for _ in range(rng.randint(1, 4))})
        text = ""
        for _ in range(12):  # the text grows by a "token" at a time, as in the engine
            new = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            text += new
            hit = find_stop_string(text, len(new), stops)
            assert hit == _reference_hit(text, len(new), stops), (text, new, stops)
            if hit is not None:
                break
            assert held_back_chars(text, stops) == _reference_held(text, stops), (text, stops)


def test_matching_work_per_token_does_not_grow_with_the_text():
    """The engine's per-token calls on a long output read the same bounded window every time."""
    params = SamplingParams(stop=["the end of it", "Z" * 40])
    text = _WatchedText("")
    sizes = []
    piece = "word and more "
    for step in range(2000):
        text = _WatchedText(str(text) + piece)
        assert find_stop_string(text, len(piece), params.stop_strs, params.max_stop_len) is None
        held_back_chars(text, params.stop_strs, params.max_stop_len)
        sizes.append(max(text.slices))
    assert max(sizes) <= len(piece) + params.max_stop_len - 1
