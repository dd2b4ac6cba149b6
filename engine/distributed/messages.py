"""What the driver broadcasts to every rank, once per event (typed, picklable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StepMessage:
    """Run one step: ``host`` is the step's ``HostInput`` (numpy arrays and small values)."""

    host: Any


@dataclass(frozen=True)
class LoRAMessage:
    """Mirror an adapter change of the driver's LoRA manager: ``op`` is "add" (args: name, int_id,
    path) or "remove" (args: name)."""

    op: str
    args: tuple


@dataclass(frozen=True)
class ShutdownMessage:
    """Leave the loop and exit 0."""
