"""benchmarks/prefix_caching.py runs end to end on a tiny model and reports exact cache hits."""

from __future__ import annotations

import importlib.util
import json
import pathlib

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "prefix_caching.py"


def test_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("prefix_caching_bench", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--hidden", "64", "--layers", "1", "--num-prompts", "4", "--num-prefixes", "1",
                     "--prefix-len", "32", "--suffix-len", "4:8", "--output-len", "2:3", "--num-sequential", "2",
                     "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    (result_file,) = tmp_path.glob("prefix-caching-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    on, off = result["runs"]["caching on"], result["runs"]["caching off"]
    assert result["outputs_identical"]
    assert off["prefix_cache_hits"] == 0 and on["prefix_cache_hits"] == 3 * 32  # requests 2..4 reuse the prefix
    assert on["prefix_cache_queries"] == off["prompt_tokens"] == on["prompt_tokens"]
    assert on["output_tokens"] == off["output_tokens"] > 0 and result["ratio_on_to_off"]["total_tokens_per_s"] > 0
