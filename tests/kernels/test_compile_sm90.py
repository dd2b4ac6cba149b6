"""The GPU path, without a GPU: every standard launch compiles for sm_90 (H100/H200) through Triton's
own ptxas, with no register spills, 16-byte global loads, and tensor-core instructions in attention.

The interpreter runs the kernels' Python semantics only; this catches what it cannot (code the
GPU compiler rejects, spills, scalar loads). It runs in a subprocess because this test session
decorates the kernels for the interpreter.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    out = subprocess.run(
        [sys.executable, "-m", "pageant.kernels.compile_check", "--json", "--arch", "90"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_every_kernel_compiles(compiled):
    kernels = {r["kernel"] for r in compiled}
    assert kernels == {
        "_decode_kernel", "_decode_reduce_kernel", "_prefill_kernel",
        "_reshape_and_cache_kernel", "_rms_norm_kernel", "_rotary_kernel", "_moe_gemm_kernel",
    }
    assert len(compiled) >= 25


def test_no_register_spills(compiled):
    spilled = [(r["label"], r["kernel"], r["stack_bytes"]) for r in compiled if r["stack_bytes"] > 0]
    assert not spilled


def test_global_loads_are_16_bytes_wide(compiled):
    scalar = [(r["label"], r["kernel"]) for r in compiled if r["vector_global_loads"] == 0]
    assert not scalar


def test_attention_runs_on_tensor_cores(compiled):
    attention = [r for r in compiled if r["kernel"] in ("_decode_kernel", "_prefill_kernel", "_moe_gemm_kernel")]
    assert attention and all(r["tensor_core_ops"] > 0 for r in attention)
    # 16-bit prefill (every head size) uses Hopper's warpgroup MMA, not only the older mma.sync path
    prefill16 = [r for r in attention if r["label"].startswith(("prefill bf16", "prefill fp16"))]
    assert len(prefill16) >= 4
    assert all(any(op.startswith("HGMMA") for op in r["sass_ops"]) for r in prefill16)


# --- quantized GEMMs (kernels/quant_gemm.py): their own launch set, compile_check.quant_main ---------

@pytest.fixture(scope="module")
def compiled_quant():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    code = "import sys; from pageant.kernels.compile_check import quant_main; sys.exit(quant_main(['--json']))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_quant_gemm_kernels_compile_without_spills(compiled_quant):
    assert {r["kernel"] for r in compiled_quant} == {
        "_dequant_gemm_kernel", "_group_quant_fp8_kernel", "_w8a8_block_fp8_kernel"}
    assert {r["arch"] for r in compiled_quant} == {80, 90}  # the FP8 weight-only fallback builds for Ampere
    assert len(compiled_quant) >= 14
    spilled = [(r["label"], r["stack_bytes"]) for r in compiled_quant if r["stack_bytes"] > 0]
    assert not spilled


def test_quant_gemms_use_tensor_cores_and_wide_loads(compiled_quant):
    gemms = [r for r in compiled_quant if r["kernel"] != "_group_quant_fp8_kernel"]
    assert gemms and all(r["vector_global_loads"] > 0 for r in gemms)
    # every dequant GEMM and the decode-sized W8A8 one on HMMA / HGMMA; the prefill-sized W8A8 GEMM
    # runs FP8 wgmma (QGMMA), which the SASS counter does not list, so it is not checked here
    mma = [r for r in gemms if r["kernel"] == "_dequant_gemm_kernel" or r["label"].endswith("t4")]
    assert len(mma) >= 11 and all(r["tensor_core_ops"] > 0 for r in mma)
    prefill = [r for r in mma if r["label"].endswith("t512")]  # 64-row tiles: Hopper wgmma (fp32: TF32 wgmma)
    assert prefill and all(any(op.startswith("HGMMA") for op in r["sass_ops"]) for r in prefill)
