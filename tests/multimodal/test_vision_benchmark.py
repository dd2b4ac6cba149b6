"""``benchmarks/vision.py --quick`` runs and writes its JSON + PNG: both engines, images/s and TTFT,
and with the cache off the chunked prompts re-encode their images."""

from __future__ import annotations

import importlib.util
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_vision_benchmark_quick(tmp_path):
    spec = importlib.util.spec_from_file_location("vision_bench", ROOT / "benchmarks" / "vision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    (result_file,) = tmp_path.glob("vision-cpu-*.json")
    assert result_file.with_suffix(".png").is_file()
    result = json.loads(result_file.read_text())
    on, off = result["runs"]["encoder_cache_on"], result["runs"]["encoder_cache_off"]
    assert result["image_tokens"] == 16 and on["images_per_s"] > 0 and on["mean_ttft_s"] > 0
    assert on["images_encoded_per_round"] == 4 < off["images_encoded_per_round"]
