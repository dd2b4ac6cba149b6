"""The checkpoint's Hugging Face tokenizer behind a small, stable interface."""

from __future__ import annotations

import pathlib
from typing import Any

from pageant.engine.exceptions import InvalidRequestError


class Tokenizer:
    """Wraps a ``transformers`` tokenizer: ``encode``/``decode``, the chat template, eos ids.

    ``encode`` adds the tokenizer's special tokens (e.g. bos) but never doubles a bos that the
    text (say, a rendered chat template) already starts with.
    """

    def __init__(self, path: str | pathlib.Path, revision: str | None = None, extra_eos_ids: tuple[int, ...] = ()):
        from transformers import AutoTokenizer

        try:
            self.hf_tokenizer = AutoTokenizer.from_pretrained(str(path), revision=revision)
        except Exception as exc:
            raise ValueError(f"could not load a tokenizer from {path}: {exc}") from exc
        self.eos_token_id: int | None = self.hf_tokenizer.eos_token_id
        self.bos_token_id: int | None = self.hf_tokenizer.bos_token_id
        ids = set(extra_eos_ids)
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        self.eos_token_ids: frozenset[int] = frozenset(ids)
        self.vocab_size: int = len(self.hf_tokenizer)
        self.all_special_ids: frozenset[int] = frozenset(self.hf_tokenizer.all_special_ids)
        self._backend = _exact_backend(self.hf_tokenizer)  # the Rust tokenizer, where decode is only it

    def encode(self, text: str) -> list[int]:
        ids = list(self.hf_tokenizer.encode(text, add_special_tokens=True))
        bos = self.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``, as ``hf_tokenizer.decode`` gives it. For a fast tokenizer that does
        no clean-up after the Rust decoder (the usual case) the Rust decoder is called directly:
        the same string without transformers' per-call argument handling (detokenization calls
        this twice per generated token)."""
        if self._backend is not None and type(ids) is list:  # (anything else: transformers converts it)
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """``decode`` of each list of ids; with the exact Rust decoder (see ``decode``), one call
        for all of them, which runs without holding the GIL."""
        if self._backend is not None:
            return self._backend.decode_batch(batch, skip_special_tokens=skip_special_tokens)
        return [self.hf_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in batch]

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return self.hf_tokenizer.convert_ids_to_tokens(ids)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render ``messages`` with the checkpoint's chat template into the prompt text."""
        if not getattr(self.hf_tokenizer, "chat_template", None):
            raise InvalidRequestError("this model's tokenizer has no chat template")
        try:
            return self.hf_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
            )
        except Exception as exc:  # template errors on bad roles / shapes are the caller's fault
            raise InvalidRequestError(f"could not apply the chat template: {exc}") from exc


def _exact_backend(hf_tokenizer: Any) -> Any | None:
    """``hf_tokenizer``'s Rust ``tokenizers.Tokenizer`` when its ``decode`` of a list of ids is
    exactly the Rust decoder's output: a fast tokenizer whose class keeps transformers' own
    ``_decode`` and that does not clean up tokenization spaces afterwards. Else None."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # an older transformers: always go through hf_tokenizer.decode
        return None
    if not isinstance(hf_tokenizer, TokenizersBackend) or type(hf_tokenizer)._decode is not TokenizersBackend._decode:
        return None
    if getattr(hf_tokenizer, "clean_up_tokenization_spaces", True):
        return None
    return getattr(hf_tokenizer, "_tokenizer", None)
