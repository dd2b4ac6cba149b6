"""The Triton module's public surface: same functions and signatures as the reference."""

from __future__ import annotations

import inspect
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from pageant.kernels import cpu_ops, get_ops, reference, triton_ops

FUNCTIONS = [
    "reshape_and_cache",
    "paged_attention_decode",
    "paged_attention_prefill",
    "rms_norm",
    "fused_add_rms_norm",
    "rotary_embedding",
]


@pytest.mark.parametrize("name", FUNCTIONS)
def test_same_signature_as_reference(name):
    assert inspect.signature(getattr(triton_ops, name)) == inspect.signature(getattr(reference, name))


def test_get_ops():
    assert get_ops("triton") is triton_ops
    assert get_ops("torch") is cpu_ops  # the reference with the in-place paged attention
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_ops("cuda")


@pytest.mark.parametrize("set_late,expected", [
    # importing needs no GPU; calling on CPU tensors outside the interpreter says what to do
    (False, ("need CUDA tensors", "TRITON_INTERPRET=1")),
    # kernels decorated for the GPU stay so: setting the variable late must not lead into Triton
    (True, ("first imported",)),
], ids=["without-interpreter", "interpreter-switched-on-after-import"])
def test_cpu_tensors_outside_the_interpreter_get_a_clear_error(set_late, expected):
    code = (
        "import os, torch; from pageant.kernels import triton_ops\n"
        + ("os.environ['TRITON_INTERPRET'] = '1'\n" if set_late else "")
        + "try:\n"
        "    triton_ops.rms_norm(torch.ones(2, 16), torch.ones(16), 1e-6)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert all(text in out.stdout for text in expected), out.stdout


def _attention(name: str, query, k_cache, v_cache):
    """Call one paged attention kernel on one sequence of one token."""
    tables, seq_lens = torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    if name == "paged_attention_decode":
        return triton_ops.paged_attention_decode(query, k_cache, v_cache, tables, seq_lens, 1.0)
    query_start_loc = torch.tensor([0, query.shape[0]], dtype=torch.int32)
    return triton_ops.paged_attention_prefill(query, k_cache, v_cache, tables, query_start_loc, seq_lens, 1.0)


@pytest.mark.parametrize("name", ["paged_attention_decode", "paged_attention_prefill"])
def test_attention_kernels_check_the_query_against_the_caches(name):
    cache = torch.zeros(2, 8, 2, 16)
    with pytest.raises(ValueError, match="do not fit query"):
        _attention(name, torch.zeros(1, 4, 32), cache, cache)
    with pytest.raises(ValueError, match="do not fit query"):
        _attention(name, torch.zeros(1, 4, 16), cache, torch.zeros(3, 8, 2, 16))
    with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
        _attention(name, torch.zeros(1, 3, 16), cache, cache)
    strided = torch.zeros(2, 8, 2, 32)[..., ::2]  # head_dim 16 with stride 2
    with pytest.raises(ValueError, match="head_dim must be contiguous"):
        _attention(name, torch.zeros(1, 4, 16), strided, strided)
