"""benchmarks/overhead.py runs end to end on tiny shapes and writes its result and plot (timings
on the CPU mean nothing here: only their structure is checked); the forward timer it wraps around
``runner.execute`` is removed afterwards and the engine's requests are all gone."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def load_bench():
    spec = importlib.util.spec_from_file_location("overhead_bench", BENCHMARKS / "overhead.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_overhead_benchmark_smoke(tmp_path):
    bench = load_bench()
    rc = bench.main(["--batch-sizes", "1,3", "--steps", "3", "--warmup-steps", "1", "--repeats", "2",
                     "--out", str(tmp_path)])
    assert rc == 0
    (result_file,) = tmp_path.glob("overhead-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    assert result["benchmark"] == "overhead" and result["settings"]["hidden"] == 64
    assert result["settings"]["layers"] == 1 and result["settings"]["batch_sizes"] == [1, 3]
    rows = result["batches"]
    assert [r["batch_size"] for r in rows] == [1, 3]
    for r in rows:
        assert 0 < r["forward_ms"] < r["step_ms"]  # the forward is part of the step
        assert r["host_ms"] == pytest.approx(r["step_ms"] - r["forward_ms"])
        assert r["host_fraction"] == pytest.approx(r["host_ms"] / r["step_ms"]) and 0 < r["host_fraction"] < 1
        assert r["host_us_per_seq"] == pytest.approx(1e3 * r["host_ms"] / r["batch_size"])


def test_measure_times_decode_steps_only(tmp_path):
    from pageant.engine import LLM
    from pageant.engine.bench.scripts import small_llama

    bench = load_bench()
    args = bench.parse_args(["--batch-sizes", "4", "--steps", "2", "--warmup-steps", "0"])
    llm = LLM(model=small_llama(tmp_path / "m", 64, 1), max_num_seqs=4, max_model_len=256)
    execute = llm.engine.runner.execute
    seen = []
    llm.engine.runner.execute = lambda so, inp: seen.append(so.num_decode_seqs == len(so.scheduled)) or execute(so, inp)
    m = bench.measure(llm, 4, args, 0)
    assert seen[0] is False and seen[1:] == [True, True]  # the prefill ran, untimed; then 2 timed decodes
    assert set(m) == {"step_s", "forward_s"} and 0 < m["forward_s"] < m["step_s"]
    assert not llm.engine.has_unfinished_requests() and not llm.engine.scheduler.has_unfinished()


@pytest.mark.parametrize("flags", [["--batch-sizes", "4,x"], ["--batch-sizes", "0"], ["--steps", "0"]])
def test_bad_flags(flags):
    with pytest.raises(SystemExit):
        load_bench().parse_args(flags)
