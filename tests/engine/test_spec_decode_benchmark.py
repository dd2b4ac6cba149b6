"""benchmarks/spec_decode.py runs end to end with tiny settings (a draft trained for a few steps with
the demo recipe) and writes its result and plot; every configuration produced the same tokens
(the script checks it) and the counters add up. Timings on the CPU mean nothing here."""

from __future__ import annotations

import importlib.util
import json
import pathlib

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_spec_decode_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("spec_decode_bench", BENCHMARKS / "spec_decode.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--quick", "--out", str(tmp_path)])  # --quick: 16 new tokens, batch 1 and 2
    assert rc == 0
    (result_file,) = tmp_path.glob("spec_decode-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    runs = result["runs"]
    assert set(runs) == {f"{m}-b{b}" for m in ("none", "ngram", "draft_model") for b in (1, 2)}
    assert all(r["output_tokens"] == 16 * r["batch"] for r in runs.values())
    assert runs["none-b1"]["speedup"] == 1.0 and runs["none-b1"]["num_drafts"] == 0
    draft = runs["draft_model-b2"]
    assert draft["num_drafts"] > 0 and 0 <= draft["num_accepted_tokens"] <= draft["num_draft_tokens"]
    assert result["settings"]["draft_params"] < result["settings"]["target_params"] / 5
