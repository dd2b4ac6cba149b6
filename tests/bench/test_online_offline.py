"""benchmarks/online_offline.py --quick end to end: a random model, LLM.generate in-process, then
`pageant serve` in a subprocess loaded with the same requests, streamed and not (timings on a shared
CPU mean nothing here: the structure of the result and the exact token counts are checked)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def load_bench():
    spec = importlib.util.spec_from_file_location("online_offline_bench", BENCHMARKS / "online_offline.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_quick_run_writes_both_sides_and_their_ratio(tmp_path):
    assert load_bench().main(["--quick", "--out", str(tmp_path)]) == 0
    (result_file,) = tmp_path.glob("online-offline-cpu-*.json")
    assert result_file.with_suffix(".png").stat().st_size > 10_000
    r = json.loads(result_file.read_text())
    assert r["benchmark"] == "online-offline" and r["timing"] == "wall"
    assert r["settings"]["quick"] and r["settings"]["num_prompts"] == 8 and r["settings"]["hidden"] == 64
    w = r["workload"]
    assert w["num_requests"] == 8 and 8 * 8 <= w["prompt_tokens"] <= 8 * 32 and 8 * 4 <= w["output_tokens"] <= 8 * 16
    offline = r["offline"]
    assert len(offline["seconds"]) == 1 and offline["output_tokens_per_s"] > 0
    assert offline["output_tokens_per_s"] == pytest.approx(w["output_tokens"] / min(offline["seconds"]))
    for mode in ("stream", "plain"):
        online = r["online"][mode]
        assert online["output_tokens_per_s"] == pytest.approx(w["output_tokens"] / min(online["seconds"]))
        assert r["ratio"][mode] == pytest.approx(online["output_tokens_per_s"] / offline["output_tokens_per_s"])
        assert r["meets_target"][mode] == (r["ratio"][mode] >= r["target_ratio"] == 0.85)
        assert online["server_cpu_s"] > 0 and online["client_cpu_s"] > 0
        assert online["e2e_ms"]["p99"] >= online["ttft_ms"]["median"] > 0
        assert online["texts_equal_offline"] == 8  # greedy: the server generates what LLM.generate does


@pytest.mark.parametrize("flags", [["--input-len", "9:3"], ["--num-prompts", "0"],
                                   ["--input-len", "900", "--output-len", "200"]])
def test_bad_flags(flags):
    with pytest.raises(SystemExit):
        load_bench().parse_args(flags)


def test_unknown_build_size_is_a_clear_error(tmp_path):
    bench = load_bench()
    with pytest.raises(SystemExit, match="--build-size 'huge'"):
        bench.build_model(bench.parse_args(["--build-size", "huge"]), tmp_path)
