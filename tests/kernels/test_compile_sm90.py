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
