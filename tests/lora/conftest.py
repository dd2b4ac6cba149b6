"""LoRA tests: Triton kernels run in the CPU interpreter, so set it before triton is imported."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
