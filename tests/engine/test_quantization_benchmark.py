"""benchmarks/quantization.py runs end to end on tiny shapes and writes its result and plot
(timings on the CPU mean nothing here); the weight bytes it reports are what each format stores."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

pytest.importorskip("compressed_tensors")

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"


def test_quantization_benchmark_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("quantization_bench", BENCHMARKS / "quantization.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--hidden", "256", "--layers", "1", "--intermediate", "256", "--num-prompts", "2",
                     "--prompt-len", "8", "--output-len", "2", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    (result_file,) = tmp_path.glob("quantization-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    runs = result["runs"]
    assert list(runs) == list(bench.FORMATS) and all(r["output_tokens"] == 4 for r in runs.values())
    # one layer: qkv [512, 256] (q: 4 heads of 64; k, v: 2 KV heads each), o [256, 256], gate_up [512, 256],
    # down [256, 256]
    rows, weights = 512 + 256 + 512 + 256, (512 + 256 + 512) * 256 + 256 * 256
    assert all(r["num_weights"] == weights for r in runs.values())
    assert runs["float32"]["weight_bytes"] == 4 * weights
    assert runs["fp8-channel"]["weight_bytes"] == runs["fp8-online"]["weight_bytes"] == weights + 4 * rows
    assert runs["w8a8-int8"]["weight_bytes"] == weights + 4 * rows
    blocks = 4 * 2 + 2 * 2 + 4 * 2 + 2 * 2  # [out / 128, in / 128] per layer
    assert runs["fp8-block"]["weight_bytes"] == weights + 4 * blocks
    # int4 group 128: half a byte a weight, a float32 scale per 128, the int64 [2] weight_shape per layer
    assert runs["int4-g128-sym"]["weight_bytes"] == weights // 2 + 4 * weights // 128 + 4 * 16
    # AWQ / GPTQ: + a uint8 zero point per group (GPTQ: + an int32 g_idx per input feature)
    assert runs["awq-int4-g128"]["weight_bytes"] == weights // 2 + 5 * weights // 128
    assert runs["gptq-int4-g128"]["weight_bytes"] == weights // 2 + 5 * weights // 128 + 4 * 4 * 256
    assert runs["int4-g32-asym"]["bytes_per_weight"] < runs["int8-channel"]["bytes_per_weight"] < 1.1
    assert result["ratio_to_float"]["float32"] == 1.0 and runs["float32"]["weight_ratio_to_float"] == 1.0
