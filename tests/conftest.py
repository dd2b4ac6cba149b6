"""Shared fixtures: tiny checkpoints built once per test session (no network)."""

from __future__ import annotations

import pytest


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
