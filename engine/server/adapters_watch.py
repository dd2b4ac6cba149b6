"""LoRA adapters from `--lora-modules` and a watched `--lora-modules-file`.

The file (``{"adapters": [{"name": ..., "path": ...}]}``) is how the operator makes adapters go live
without restarting pods: the server reads it at start and polls it (mtime and content) every few
seconds, loading and unloading adapters to match. The engine loads adapters through
``engine.add_lora(LoRARequest) -> bool`` and ``engine.remove_lora(name) -> bool`` (vLLM's names).
An adapter that is removed from the file stops being routable at once; the engine unloads it as
soon as no unfinished request uses it (``remove_lora`` refuses while one does, so it is retried on
every poll). Adapters configured on an engine without LoRA enabled are a clear startup error.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import pathlib
from dataclasses import dataclass

from pageant.engine.lora import LoRARequest

logger = logging.getLogger("pageant.server")


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


def validate_specs(specs: list[AdapterSpec], *, allowed_root: str | None, base_names: list[str]) -> None:
    """Unique names (not the base model's) and paths under the allowed root. More adapters than
    ``--max-cpu-loras`` is fine: the engine's LRU cache reloads evicted ones from their path."""
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen or spec.name in base_names:
            raise AdapterConfigError(f"adapter name {spec.name!r} is used twice (or is the base model's name)")
        seen.add(spec.name)
        if allowed_root is not None:
            root = pathlib.Path(allowed_root).resolve()
            target = pathlib.Path(spec.path).resolve()
            if target != root and root not in target.parents:
                raise AdapterConfigError(f"adapter {spec.name!r}: {spec.path} is outside --allowed-lora-root {allowed_root}")


def engine_supports_lora(engine) -> bool:
    """The engine can load adapters now (it has the methods and LoRA is enabled in its config)."""
    has_methods = callable(getattr(engine, "add_lora", None)) and callable(getattr(engine, "remove_lora", None))
    return has_methods and bool(getattr(getattr(engine, "config", None), "enable_lora", False))


class AdapterManager:
    """Keeps the engine's loaded adapters equal to ``--lora-modules`` plus the watched file."""

    def __init__(self, async_engine, *, static: list[AdapterSpec], file: str | None, allowed_root: str | None,
                 base_names: list[str], max_loras: int = 0,
                 poll_interval: float = 2.0):
        self.async_engine = async_engine
        self.static = list(static)
        self.file = file
        self.allowed_root = allowed_root
        self.base_names = base_names
        self.max_loras = max_loras
        self.poll_interval = poll_interval
        self.loaded: dict[str, LoRARequest] = {}  # routable adapters
        self.removing: dict[str, LoRARequest] = {}  # unroutable, still loaded while requests use them
        self._next_id = 1
        self._fingerprint: tuple | None = None
        self.last_error: str | None = None

    @property
    def supported(self) -> bool:
        return engine_supports_lora(self.async_engine.engine)

    def desired(self) -> list[AdapterSpec]:
        specs = self.static + (read_adapters_file(self.file) if self.file else [])
        validate_specs(specs, allowed_root=self.allowed_root, base_names=self.base_names)
        return specs

    def check_startup(self) -> list[AdapterSpec]:
        """Raise ``AdapterConfigError`` if the configured adapters cannot be served at all."""
        specs = self.desired()
        if specs and not self.supported:
            names = ", ".join(s.name for s in specs)
            raise AdapterConfigError(
                f"LoRA adapters are configured ({names}) but LoRA is not enabled: pass --enable-lora "
                "(or remove --lora-modules / empty the --lora-modules-file)"
            )
        return specs

    def load_at_startup(self) -> None:
        """Load the configured adapters on the engine directly (before its thread starts); a bad
        adapter raises ``AdapterConfigError``."""
        specs = self.check_startup()
        engine = self.async_engine.engine
        for spec in specs:
            req = LoRARequest(spec.name, self._next_id, spec.path)
            self._next_id += 1
            try:
                engine.add_lora(req)
            except Exception as exc:  # noqa: BLE001 - LoRAAdapterError and friends: one clear line
                raise AdapterConfigError(f"adapter {spec.name!r}: {exc}") from None
            self.loaded[spec.name] = req
            logger.info("loaded LoRA adapter %s from %s", spec.name, spec.path)
        self._fingerprint = self._file_fingerprint()

    def lora_request(self, name: str) -> LoRARequest | None:
        return self.loaded.get(name)

    def _file_fingerprint(self) -> tuple | None:
        if not self.file:
            return None
        try:
            st = os.stat(self.file)
            data = pathlib.Path(self.file).read_bytes()
        except FileNotFoundError:
            return ("missing",)
        return (st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())

    async def sync(self) -> None:
        """Load new adapters; make removed (or re-pointed) ones unroutable and unload them."""
        want = {s.name: s for s in self.desired()}
        if want and not self.supported:
            raise AdapterConfigError("LoRA adapters are configured but LoRA is not enabled (--enable-lora)")
        for name, req in list(self.loaded.items()):
            if name not in want or want[name].path != req.lora_path:
                self.removing[name] = self.loaded.pop(name)
        await self._unload_pending()
        errors = []
        for name, spec in want.items():
            if name in self.loaded or name in self.removing:
                continue  # a re-pointed adapter is loaded again once its old version is gone
            req = LoRARequest(spec.name, self._next_id, spec.path)
            self._next_id += 1
            try:
                await self.async_engine.call(lambda e, r=req: e.add_lora(r))
            except Exception as exc:  # noqa: BLE001 - one bad adapter must not block the others
                errors.append(f"adapter {name!r}: {exc}")
                continue
            self.loaded[name] = req
            logger.info("loaded LoRA adapter %s from %s", name, spec.path)
        if errors:
            raise AdapterConfigError("; ".join(errors))

    async def _unload_pending(self) -> bool:
        """Try to unload adapters that left the config; True if some are still waiting."""
        for name, req in list(self.removing.items()):
            try:
                await self.async_engine.call(lambda e, n=name: e.remove_lora(n))
            except Exception as exc:  # noqa: BLE001 - in use: retried on the next poll
                logger.info("adapter %s is still in use; unloading it later (%s)", name, exc)
                continue
            del self.removing[name]
            logger.info("unloaded LoRA adapter %s", name)
        return bool(self.removing)

    async def watch(self) -> None:
        """Poll the adapters file forever; errors are logged and kept in ``last_error``, never raised."""
        while True:
            fingerprint = self._file_fingerprint()
            if self.removing and await self._unload_pending() is False:
                self._fingerprint = None  # re-pointed adapters can be loaded again now
            if fingerprint != self._fingerprint:
                try:
                    await self.sync()
                    self._fingerprint = fingerprint
                    self.last_error = None
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - a bad edit must not take the server down
                    self.last_error = str(exc)
                    self._fingerprint = fingerprint
                    logger.error("adapters file %s: %s", self.file, exc)
            await asyncio.sleep(self.poll_interval)
