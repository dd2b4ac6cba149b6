"""pageant.engine.bench.scripts: what the scripts in benchmarks/ share."""

from __future__ import annotations

import argparse
import json

from pageant.engine.bench.scripts import device_label, is_cuda, result_header, save_result, small_llama


def test_result_header_and_saving(tmp_path):
    args = argparse.Namespace(device="cpu", hidden=64, out=str(tmp_path))
    header = result_header("demo", args)
    assert header["benchmark"] == "demo" and header["timing"] == "cpu"
    assert header["settings"] == {"device": "cpu", "hidden": 64}  # --out is not a setting
    assert header["device"] == device_label("cpu") and header["device"].startswith("cpu (")
    plotted = []
    path = save_result(header, tmp_path / "results", "demo", "cuda:0", plotted.append)
    assert path.parent == tmp_path / "results" and path.name.startswith("demo-cuda-") and path.suffix == ".json"
    assert json.loads(path.read_text()) == header
    assert plotted == [path.with_suffix(".png")]
    assert is_cuda("cuda:1") and not is_cuda("cpu")


def test_small_llama_shape(tmp_path):
    path = small_llama(tmp_path / "m", 128, 1, max_position_embeddings=256)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert path == str(tmp_path / "m")
    assert config["hidden_size"] == 128 and config["intermediate_size"] == 352 and config["num_hidden_layers"] == 1
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["max_position_embeddings"] == 256
