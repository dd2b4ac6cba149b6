"""LoRA adapters: `--lora-modules`, a watched `--lora-modules-file`, and the runtime HTTP endpoints.

The file (``{"adapters": [{"name": ..., "path": ...}]}``) is how the operator makes adapters go live
without restarting pods: the server reads it at start and polls it (mtime and content) every few
seconds, loading and unloading adapters to match. The engine loads adapters through
``engine.add_lora(LoRARequest) -> bool`` and ``engine.remove_lora(name) -> bool`` (vLLM's names).
An adapter that is removed from the file stops being routable at once; the engine unloads it as
soon as no unfinished request uses it (``remove_lora`` refuses while one does, so it is retried on
every poll). Adapters configured on an engine without LoRA enabled are a clear startup error.

``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter`` (vLLM's endpoints) load and
unload adapters at run time (``load`` / ``unload`` below). Every adapter remembers its *origin*
(``"static"``: --lora-modules, ``"file"``: the watched file, ``"api"``: the HTTP endpoints), so the
two mechanisms never fight:

- the file watcher only adds and removes ``static``/``file`` adapters. A file entry whose name an
  ``api`` adapter holds is adopted when it names the same path (the adapter is then the file's and
  goes when the file drops it) and is an error otherwise (the HTTP adapter stays; the file's is
  loaded as soon as the HTTP one is unloaded);
- the HTTP unload removes ``api`` and ``file`` adapters (the operator unloads at once instead of
  waiting a minute for kubelet to refresh the mounted file); a ``file`` adapter unloaded over HTTP
  stays unloaded until the file's content changes. ``static`` adapters are refused (400).

Unload semantics (``unload``): the adapter stops being routable at once (new requests for it get
404), then the server waits up to ``unload_timeout`` seconds for the adapter's unfinished requests
to end. If they do, the adapter is unloaded (200). If they do not, the unload is *refused* with
409 and the adapter is routable again, exactly as before the call: nothing in flight is cut off,
and the caller may retry later (or cancel the requests). All engine calls go through the engine
thread (``AsyncEngine.call``); the event loop never touches the ``LLMEngine``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import pathlib

from pageant.engine.adapters import resolve_adapter_dir
from pageant.engine.lora import LoRARequest
from pageant.engine.server.adapters_config import (AdapterConfigError, AdapterSpec, engine_supports_lora,
                                                   read_adapters_file, validate_specs)
from pageant.engine.server.validation import APIError

logger = logging.getLogger("pageant.server")


class AdapterManager:
    """The server's adapters: ``--lora-modules`` plus the watched file (kept equal to the config)
    plus those loaded over HTTP (kept until unloaded over HTTP). See the module docstring."""

    def __init__(self, async_engine, *, static: list[AdapterSpec], file: str | None, allowed_root: str | None,
                 base_names: list[str], max_loras: int = 0, poll_interval: float = 2.0,
                 unload_timeout: float = 30.0):
        self.async_engine = async_engine
        self.static = list(static)
        self.file = file
        self.allowed_root = allowed_root
        self.base_names = base_names
        self.max_loras = max_loras
        self.poll_interval = poll_interval
        self.unload_timeout = unload_timeout
        self.loaded: dict[str, LoRARequest] = {}  # routable adapters
        self.removing: dict[str, LoRARequest] = {}  # unroutable, still loaded while requests use them
        self.origin: dict[str, str] = {}  # name -> "static" | "file" | "api", for loaded and removing
        self.paths: dict[str, str] = {}  # name -> lora_path as configured or posted (shown in /v1/models)
        self._busy: set[str] = set()  # names an HTTP load or unload is working on
        self._suppressed: dict[str, str | None] = {}  # file adapters unloaded over HTTP -> file content then
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

    def _origin_of(self, spec: AdapterSpec) -> str:
        return "static" if spec in self.static else "file"

    def _new_request(self, name: str, path: str) -> LoRARequest:
        req = LoRARequest(name, self._next_id, path)
        self._next_id += 1
        return req

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
            req = self._new_request(spec.name, spec.path)
            try:
                engine.add_lora(req)
            except Exception as exc:  # noqa: BLE001 - LoRAAdapterError and friends: one clear line
                raise AdapterConfigError(f"adapter {spec.name!r}: {exc}") from None
            self._register(req, self._origin_of(spec), spec.path)
            logger.info("loaded LoRA adapter %s from %s", spec.name, spec.path)
        self._fingerprint = self._file_fingerprint()

    def lora_request(self, name: str) -> LoRARequest | None:
        return self.loaded.get(name)

    async def _engine_request(self, name: str, path: str) -> LoRARequest:
        """The request the engine loads. Without --allowed-lora-root a path may be a Hugging Face Hub
        id: it is downloaded here, off the engine thread, and the engine reads the local copy (with a
        root the engine resolves the path under it and never downloads)."""
        if self.allowed_root is None:
            path = str(await asyncio.to_thread(resolve_adapter_dir, path, None))
        return self._new_request(name, path)

    def _register(self, req: LoRARequest, origin: str, path: str) -> None:
        self.loaded[req.lora_name] = req
        self.origin[req.lora_name] = origin
        self.paths[req.lora_name] = path

    def _forget(self, name: str) -> None:
        self.origin.pop(name, None)
        self.paths.pop(name, None)

    def _content_digest(self) -> str | None:
        fingerprint = self._file_fingerprint()
        return None if fingerprint is None else fingerprint[-1]

    def _file_fingerprint(self) -> tuple | None:
        if not self.file:
            return None
        try:
            st = os.stat(self.file)
            data = pathlib.Path(self.file).read_bytes()
        except FileNotFoundError:
            return ("missing",)
        return (st.st_mtime_ns, st.st_size, hashlib.sha256(data).hexdigest())

    # ------------------------------------------------------------------ the watched config
    async def sync(self) -> None:
        """Load new adapters; make removed (or re-pointed) ones unroutable and unload them. Only
        ``static``/``file`` adapters are touched: those loaded over HTTP are left alone (or adopted)."""
        want = {s.name: s for s in self.desired()}
        if want and not self.supported:
            raise AdapterConfigError("LoRA adapters are configured but LoRA is not enabled (--enable-lora)")
        digest = self._content_digest()
        self._suppressed = {n: d for n, d in self._suppressed.items() if d == digest and n in want}
        for name, req in list(self.loaded.items()):
            if self.origin.get(name) == "api" or name in self._busy:
                continue
            if name not in want or want[name].path != self.paths.get(name):
                self.removing[name] = self.loaded.pop(name)
        await self._unload_pending()
        errors = []
        for name, spec in want.items():
            if name in self._busy:  # the HTTP load or unload in progress looks at the config when it ends
                continue
            if self.origin.get(name) == "api":
                if self.paths.get(name) == spec.path and name in self.loaded:
                    self.origin[name] = self._origin_of(spec)  # the same adapter: the config owns it now
                    continue
                errors.append(f"adapter {name!r}: the name is taken by an adapter loaded over the HTTP API from "
                              "another path; unload it there first")
                continue
            if name in self.loaded or name in self.removing or name in self._suppressed:
                continue  # a re-pointed adapter is loaded again once its old version is gone
            try:
                req = await self._engine_request(spec.name, spec.path)
                await self.async_engine.call(lambda e, r=req: e.add_lora(r))
            except Exception as exc:  # noqa: BLE001 - one bad adapter must not block the others
                errors.append(f"adapter {name!r}: {exc}")
                continue
            self._register(req, self._origin_of(spec), spec.path)
            logger.info("loaded LoRA adapter %s from %s", name, spec.path)
        if errors:
            raise AdapterConfigError("; ".join(errors))

    async def _unload_pending(self) -> bool:
        """Try to unload adapters that left the config; True if some are still waiting."""
        for name, req in list(self.removing.items()):
            if name in self._busy:
                continue  # an HTTP unload is waiting on it
            try:
                await self.async_engine.call(lambda e, n=name: e.remove_lora(n))
            except Exception as exc:  # noqa: BLE001 - in use: retried on the next poll
                logger.info("adapter %s is still in use; unloading it later (%s)", name, exc)
                continue
            del self.removing[name]
            self._forget(name)
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

    # ------------------------------------------------------------------ the HTTP endpoints
    def _require_lora(self) -> None:
        if not self.supported:
            raise APIError(400, "LoRA adapters are not enabled on this server: start it with --enable-lora",
                           code="lora_not_enabled")

    async def load(self, name: str, path: str) -> LoRARequest:
        """``POST /v1/load_lora_adapter``: validate and load, or raise ``APIError`` (400) and load nothing.
        Shielded: a caller that goes away mid-load cannot leave the engine and this registry apart."""
        return await asyncio.shield(asyncio.ensure_future(self._load(name, path)))

    async def unload(self, name: str) -> None:
        """``POST /v1/unload_lora_adapter``: unroutable at once, then unloaded once its requests end
        (up to ``unload_timeout`` seconds); 409 and routable again if they do not end in time.
        Shielded like ``load``."""
        return await asyncio.shield(asyncio.ensure_future(self._unload(name)))

    def _config_spec(self, name: str) -> AdapterSpec | None:
        """The watched config's entry for ``name`` (None if none, or if the config is broken now)."""
        try:
            return next((spec for spec in self.desired() if spec.name == name), None)
        except (AdapterConfigError, OSError):
            return None

    async def _load(self, name: str, path: str) -> LoRARequest:
        self._require_lora()
        if not name or not path:
            raise APIError(400, "both lora_name and lora_path must be non-empty", code="invalid_lora_adapter",
                           param="lora_name" if not name else "lora_path")
        if name in self.base_names:
            raise APIError(400, f"The lora adapter name {name!r} collides with the base model's name.",
                           param="lora_name", code="invalid_lora_adapter")
        if name in self.loaded or name in self.removing or name in self._busy:
            raise APIError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name",
                           code="lora_adapter_already_loaded")
        self._busy.add(name)
        try:
            req = await self._engine_request(name, path)
            await self.async_engine.call(lambda e: e.add_lora(req))
        except ValueError as exc:  # LoRAAdapterError: a bad adapter, path or name; nothing was loaded
            raise APIError(400, f"Failed to load LoRA adapter {name!r}: {exc}", param="lora_path",
                           code="invalid_lora_adapter") from None
        finally:
            self._busy.discard(name)
        spec = self._config_spec(name)
        self._register(req, self._origin_of(spec) if spec is not None and spec.path == path else "api", path)
        logger.info("loaded LoRA adapter %s from %s (HTTP API)", name, path)
        return req

    async def _unload(self, name: str) -> None:
        self._require_lora()
        if name in self._busy or name in self.removing:
            raise APIError(409, f"The lora adapter '{name}' is already being loaded or unloaded; retry later.",
                           param="lora_name", code="lora_adapter_busy")
        req = self.loaded.get(name)
        if req is None:
            raise APIError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name",
                           code="lora_adapter_not_found")
        origin = self.origin.get(name)
        if origin == "static":
            raise APIError(400, f"The lora adapter '{name}' comes from --lora-modules; restart the server "
                           "without it to unload it.", param="lora_name", code="lora_adapter_from_config")
        order = list(self.loaded)
        self._busy.add(name)
        del self.loaded[name]  # unroutable from now on
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.unload_timeout
        try:
            while True:
                in_use = await self.async_engine.call(lambda e: e.num_lora_requests(name))
                if not in_use:
                    try:
                        await self.async_engine.call(lambda e: e.remove_lora(name))
                        break
                    except ValueError:  # LoRAAdapterError: a request took it meanwhile; wait for it too
                        in_use = 1
                if loop.time() >= deadline:
                    raise APIError(
                        409, f"The lora adapter '{name}' still has {in_use} unfinished request(s) after waiting "
                        f"{self.unload_timeout:g}s; it was not unloaded and is still served. Retry once they end.",
                        param="lora_name", code="lora_adapter_in_use")
                await asyncio.sleep(0.05)
        except BaseException:  # refused (409), engine gone, or cancelled: routable again, in its old place
            self.loaded[name] = req
            self.loaded = {n: self.loaded[n] for n in order if n in self.loaded} | self.loaded
            raise
        finally:
            self._busy.discard(name)
        self._forget(name)
        logger.info("unloaded LoRA adapter %s (HTTP API)", name)
        spec = self._config_spec(name)
        if spec is None:
            return
        if origin == "file":  # the file still lists it (kubelet has not refreshed it yet): wait for a change
            self._suppressed[name] = self._content_digest()
            return
        try:  # the file's adapter of this name was waiting for the HTTP one to go
            new = await self._engine_request(name, spec.path)
            await self.async_engine.call(lambda e: e.add_lora(new))
            self._register(new, self._origin_of(spec), spec.path)
            logger.info("loaded LoRA adapter %s from %s", name, spec.path)
        except Exception as exc:  # noqa: BLE001 - a bad file entry must not fail this unload
            logger.error("adapters file %s: adapter %r: %s", self.file, name, exc)
