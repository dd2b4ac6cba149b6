"""A compressed-tensors checkpoint with an FP8 ``kv_cache_scheme`` (what llm-compressor writes for
an FP8 KV cache, here without weight quantization): it loads, its k/v scales reach the attention
layers, and ``kv_cache_dtype="fp8"`` serves with them; other KV schemes are refused by name."""

from __future__ import annotations

import json
import pathlib

import pytest

from pageant.engine import LLM, SamplingParams
from pageant.engine.layers.attention import Attention
from tests.engine.test_fp8_kv_cache import _compressed_tensors_scales, _scaled_checkpoint

KV_SCHEME = {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True}


def with_kv_scheme(src: str, dst: pathlib.Path, scheme: dict) -> str:
    path = _scaled_checkpoint(src, dst, _compressed_tensors_scales(2, 2, 16, [(0.02, 0.05), (0.03, 0.04)]))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized",
                                  "quantization_status": "compressed", "config_groups": {},
                                  "kv_cache_scheme": scheme, "ignore": []}
    (dst / "config.json").write_text(json.dumps(cfg))
    return path


def test_fp8_kv_cache_scheme_loads_scales(tiny_checkpoint, tmp_path):
    path = with_kv_scheme(tiny_checkpoint, tmp_path / "kv", KV_SCHEME)
    llm = LLM(model=path, kv_cache_dtype="fp8")
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]
    assert [round(a.k_scale.item(), 4) for a in layers] == [0.02, 0.03]
    assert [round(a.v_scale.item(), 4) for a in layers] == [0.05, 0.04]
    out = llm.generate([{"prompt_token_ids": [1, 5, 6, 7]}], SamplingParams(temperature=0, max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_other_kv_cache_schemes_are_refused(tiny_checkpoint, tmp_path):
    path = with_kv_scheme(tiny_checkpoint, tmp_path / "int8kv", {**KV_SCHEME, "type": "int"})
    with pytest.raises(ValueError, match="kv_cache_scheme .* is not supported; supported: FP8"):
        LLM(model=path, kv_cache_dtype="fp8")
