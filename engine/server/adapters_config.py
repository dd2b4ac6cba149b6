"""The adapter lists a server is configured with: ``--lora-modules`` items and the
``--lora-modules-file`` JSON (``{"adapters": [{"name": ..., "path": ...}]}``), parsed and checked.
``adapters_watch.AdapterManager`` keeps the engine's adapters equal to them."""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: str


class AdapterConfigError(ValueError):
    """A bad adapter list (syntax, duplicate names, paths outside the allowed root, unsupported)."""


def parse_lora_modules(items: list[str]) -> list[AdapterSpec]:
    """``NAME=PATH`` items (or vLLM's JSON form ``{"name": ..., "path": ...}``)."""
    specs = []
    for item in items:
        item = item.strip()
        if item.startswith("{"):
            try:
                obj = json.loads(item)
                specs.append(AdapterSpec(str(obj["name"]), str(obj["path"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise AdapterConfigError(f"--lora-modules: bad JSON item {item!r}: {exc}") from None
            continue
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise AdapterConfigError(f"--lora-modules: expected NAME=PATH, got {item!r}")
        specs.append(AdapterSpec(name, path))
    return specs


def read_adapters_file(path: str | os.PathLike) -> list[AdapterSpec]:
    """Parse the adapters file; a missing or empty file means no adapters."""
    p = pathlib.Path(path)
    if not p.exists():
        return []
    text = p.read_text()
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise AdapterConfigError(f"{p}: not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("adapters", []), list):
        raise AdapterConfigError(f'{p}: expected {{"adapters": [{{"name": ..., "path": ...}}]}}')
    specs = []
    for entry in data.get("adapters", []):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("path"), str):
            raise AdapterConfigError(f"{p}: every adapter needs string 'name' and 'path', got {entry!r}")
        specs.append(AdapterSpec(entry["name"], entry["path"]))
    return specs


def _under_root(path: str, allowed_root: str) -> bool:
    """``path`` (relative paths count from the root, as the engine reads them) lies inside the root."""
    root = pathlib.Path(allowed_root).expanduser().resolve()
    raw = pathlib.Path(path).expanduser()
    target = (raw if raw.is_absolute() else root / raw).resolve()
    return target == root or root in target.parents


def validate_specs(specs: list[AdapterSpec], *, allowed_root: str | None, base_names: list[str]) -> None:
    """Unique names (not the base model's) and paths under the allowed root. More adapters than
    ``--max-cpu-loras`` is fine: the engine's LRU cache reloads evicted ones from their path."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen or spec.name in base_names:
            raise AdapterConfigError(f"adapter name {spec.name!r} is used twice (or is the base model's name)")
        seen.add(spec.name)
        if allowed_root is not None and not _under_root(spec.path, allowed_root):
            raise AdapterConfigError(f"adapter {spec.name!r}: {spec.path} is outside --allowed-lora-root {allowed_root}")


def engine_supports_lora(engine) -> bool:
    """The engine can load adapters now (it has the methods and LoRA is enabled in its config)."""
    has_methods = callable(getattr(engine, "add_lora", None)) and callable(getattr(engine, "remove_lora", None))
    return has_methods and bool(getattr(getattr(engine, "config", None), "enable_lora", False))
