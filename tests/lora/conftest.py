"""LoRA tests: an allowed adapter root. ``make_adapter`` (PEFT-saved adapters) and the Triton
interpreter switch are in the root tests/conftest.py."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> pathlib.Path:
    """An allowed adapter root folder (tests put adapters inside and outside of it)."""
    return tmp_path_factory.mktemp("lora-root")
