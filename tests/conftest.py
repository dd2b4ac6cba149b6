"""Shared fixtures: tiny checkpoints built once per test session (no network).

Triton decides between its CPU interpreter and the GPU compiler when a kernel module is first
imported, and several test folders import kernels (kernels, lora, engine with the triton backend).
This root conftest is imported before any of them, so it is the one place that can choose the
interpreter for the whole session: the suite runs on machines without a GPU. On a GPU machine,
run with ``TRITON_INTERPRET=0`` to compile the kernels instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    """``make_checkpoint(arch="llama", num_shards=1, **overrides) -> path``, built once per arguments."""
    from pageant.engine.testing import build_checkpoint

    built: dict[tuple, str] = {}

    def make(arch: str = "llama", num_shards: int = 1, **overrides) -> str:
        key = (arch, num_shards, tuple(sorted(overrides.items())))
        if key not in built:
            path = tmp_path_factory.mktemp(f"ckpt-{arch}")
            built[key] = str(build_checkpoint(path, arch=arch, num_shards=num_shards, **overrides))
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint(make_checkpoint) -> str:
    """A tiny random llama checkpoint with the trained BPE tokenizer."""
    return make_checkpoint("llama")
