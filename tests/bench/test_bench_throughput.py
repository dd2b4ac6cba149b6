"""`pageant bench throughput` end to end on a tiny checkpoint: both sides do the same work."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_throughput_cli(tmp_path):
    out_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "pageant.cli", "bench", "throughput", "--build-size", "tiny",
           "--num-prompts", "6", "--input-len", "4:40", "--output-len", "2:12", "--hf-batch-sizes", "2,4",
           "--max-num-seqs", "4", "--save-result", "--result-dir", str(out_dir), "--label", "t",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ratio pageant / best HF" in proc.stdout
    report = json.loads((out_dir / "t.json").read_text())
    assert (out_dir / "t.png").stat().st_size > 10_000
    requested = report["pageant"]["output_tokens"]
    assert requested >= 6 * 2
    # identical useful work on both sides: every request got exactly its output length
    assert all(h["output_tokens"] == requested for h in report["hf"])
    assert report["best_hf"] in {h["name"] for h in report["hf"]}
    best = max(report["hf"], key=lambda h: h["output_tokens_per_s"])
    assert report["ratio_vs_best_hf"] == report["pageant"]["output_tokens_per_s"] / best["output_tokens_per_s"]
    kv = report["kv_memory_mib"]
    assert 0 < kv["pageant_used_peak_mib"] <= kv["pageant_pool_allocated_mib"]
    assert report["pageant"]["peak_running_requests"] <= 4
    assert report["num_parameters"] > 0
