"""Fixtures for the server tests: the module's main server (an API key) and LoRA adapters.

``serve``, ``server_process`` and ``tiny_checkpoint`` come from the root tests/conftest.py.
"""

from __future__ import annotations

import pathlib

import pytest

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def api_server(serve):
    """The module's main server (a ``ServerProcess``): the tiny model, an API key, a small context."""
    return serve("--api-key", API_KEY, "--max-model-len", "256", "--num-kv-blocks", "64", "--max-num-seqs", "16",
                 "--served-model-name", "tiny", "--disable-log-requests", "--uvicorn-log-level", "warning")


@pytest.fixture(scope="session")
def make_server_adapter(make_adapter, tiny_checkpoint):
    """``make_server_adapter(seed, root=None) -> dir``: a PEFT LoRA adapter (rank 4 on q, v and down,
    random non-zero A and B) for the tiny model."""

    def make(seed: int, root: pathlib.Path | None = None) -> str:
        return make_adapter(str(tiny_checkpoint), r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"), seed=seed,
                            root=root, std=0.5)

    return make
