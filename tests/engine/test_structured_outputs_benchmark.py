"""benchmarks/structured_outputs.py runs end to end on tiny shapes and writes its result and plot."""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_structured_outputs_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("so_bench", BENCHMARKS / "structured_outputs.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--hidden", "64", "--layers", "1", "--batch", "3", "--output-len", "6", "--repeats", "1",
                       "--schema-properties", "12", "--out", str(tmp_path)]) == 0
    (result_file,) = tmp_path.glob("structured-outputs-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    assert set(result["runs"]) == {"free", "regex", "json_schema"}
    assert result["runs"]["free"]["output_tokens"] == result["runs"]["regex"]["output_tokens"] == 18
    assert result["compile"]["cold_seconds"] > result["compile"]["cached_seconds"] >= 0
