"""The demo model that ships with Pageant: `pageant serve` with no `--model` serves it.

A tiny Llama-architecture checkpoint (a few million parameters) with a byte-level BPE tokenizer and
a chat template, trained by ``engine/demo/train.py`` on text that ships with Python, so that a first
request returns English-like text instead of noise. It is a toy: do not expect facts from it.
"""

from __future__ import annotations

import pathlib

CHECKPOINT_DIR = pathlib.Path(__file__).resolve().parent / "checkpoint"
DEMO_MODEL_NAME = "pageant-demo"


def checkpoint_path() -> str:
    """The directory of the shipped demo checkpoint (config.json, model.safetensors, tokenizer)."""
    if not (CHECKPOINT_DIR / "config.json").is_file():
        raise FileNotFoundError(
            f"the demo checkpoint is missing from {CHECKPOINT_DIR}; reinstall pageant or train it with "
            "`python -m pageant.engine.demo.train`"
        )
    return str(CHECKPOINT_DIR)
