"""The LoRA half of ``LLMEngine``'s API: adapters by name, loaded on demand, mirrored on every rank."""

from __future__ import annotations

from pageant.engine.adapters import LoRAAdapterError, LoRAManager
from pageant.engine.exceptions import InvalidRequestError
from pageant.engine.lora import LoRARequest
from pageant.engine.prefix_cache import adapter_identity
from pageant.engine.sequence import Request


class EngineLoRA:
    """Mixed into ``LLMEngine``: needs ``lora_manager`` (None: LoRA off), ``_lora_identities``,
    ``runner`` and ``config``."""

    def _lora_name(self, lora_request: LoRARequest | None) -> str | None:
        """The adapter a new request uses, loaded now if it is new; InvalidRequestError if bad."""
        if lora_request is None:
            return None
        if self.lora_manager is None:
            raise InvalidRequestError("LoRA adapters are not enabled on this engine (enable_lora=False)")
        if not isinstance(lora_request, LoRARequest):
            raise InvalidRequestError("lora_request must be a LoRARequest")
        try:
            self.add_lora(lora_request)
        except LoRAAdapterError as exc:
            raise InvalidRequestError(str(exc)) from exc
        return lora_request.lora_name

    def _release_lora(self, request: Request) -> None:
        if request.lora_name is not None and self.lora_manager is not None:
            self.lora_manager.release(request.lora_name)

    def _lora(self) -> LoRAManager:
        if self.lora_manager is None:
            raise LoRAAdapterError("LoRA adapters are not enabled on this engine (enable_lora=False)")
        return self.lora_manager

    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load and validate an adapter; False if it is already loaded. Raises ``LoRAAdapterError``
        (a ValueError whose message fits an HTTP 400) for a bad adapter, path or name."""
        name, int_id, path = lora_request.lora_name, lora_request.lora_int_id, lora_request.lora_path
        added = self._lora().add_lora(name, int_id, path)
        if added and hasattr(self.runner, "lora_command"):  # every rank's manager mirrors the driver's
            self.runner.lora_command("add", (name, int_id, path))
        if added or name not in self._lora_identities:  # the prefix cache keys on the adapter's content
            self._lora_identities[name] = adapter_identity(name, int_id, path, self.config.allowed_lora_root)
        return added

    def remove_lora(self, lora: str | int) -> bool:
        """Unload an adapter by name or ``lora_int_id``; False if it is not loaded. Raises
        ``LoRAAdapterError`` while unfinished requests use it (see ``num_lora_requests``)."""
        manager = self._lora()
        name = lora if isinstance(lora, str) else next((n for n, i, _ in manager.list_loras() if i == lora), None)
        if name is None or not manager.has_lora(name):
            return False
        manager.remove_lora(name)
        if hasattr(self.runner, "lora_command"):
            self.runner.lora_command("remove", (name,))
        self._lora_identities.pop(name, None)
        return True

    def list_loras(self) -> list[LoRARequest]:
        """The loaded adapters, in the order they were added."""
        if self.lora_manager is None:
            return []
        return [LoRARequest(n, i, p) for n, i, p in self.lora_manager.list_loras()]

    def num_lora_requests(self, name: str) -> int:
        """Unfinished (running or waiting) requests that use adapter ``name``."""
        return self.lora_manager.num_running(name) if self.lora_manager is not None else 0
