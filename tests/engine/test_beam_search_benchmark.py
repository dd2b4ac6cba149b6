"""benchmarks/beam_search.py runs end to end on tiny shapes and writes its result and plot; with
prefix caching the beams hold fewer blocks than independent copies."""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_beam_search_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("beam_bench", BENCHMARKS / "beam_search.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--hidden", "64", "--layers", "1", "--beam-widths", "1,3", "--num-prompts", "2",
                       "--prompt-len", "40", "--output-len", "3", "--block-size", "8", "--out", str(tmp_path)]) == 0
    (result_file,) = tmp_path.glob("beam-search-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    rows = json.loads(result_file.read_text())["rows"]
    assert [r["beam_width"] for r in rows] == [1, 3]
    assert rows[1]["blocks_shared"] < rows[1]["blocks_independent"] == 2 * 3 * -(-(40 + 3) // 8)
    assert rows[0]["blocks_shared"] <= rows[0]["blocks_independent"] and rows[0]["blocks_no_cache"] > 0
