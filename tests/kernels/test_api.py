"""The Triton module's public surface: same functions and signatures as the reference."""

from __future__ import annotations

import inspect
import os
import pathlib
import subprocess
import sys

import pytest

from pageant.kernels import get_ops, reference, triton_ops

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
    assert get_ops("torch") is reference
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_ops("cuda")


def test_cpu_tensors_without_the_interpreter_get_a_clear_error():
    """Importing needs no GPU; calling on CPU tensors outside the interpreter says what to do."""
    code = (
        "import torch; from pageant.kernels import triton_ops\n"
        "try:\n"
        "    triton_ops.rms_norm(torch.ones(2, 16), torch.ones(16), 1e-6)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "need CUDA tensors" in out.stdout and "TRITON_INTERPRET=1" in out.stdout


def test_interpreter_switched_on_after_import_gets_the_same_clear_error():
    """Kernels decorated for the GPU stay so: setting the variable late must not lead into Triton."""
    code = (
        "import os, torch; from pageant.kernels import triton_ops\n"
        "os.environ['TRITON_INTERPRET'] = '1'\n"
        "try:\n"
        "    triton_ops.rms_norm(torch.ones(2, 16), torch.ones(16), 1e-6)\n"
        "except RuntimeError as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = pathlib.Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "first imported" in out.stdout
