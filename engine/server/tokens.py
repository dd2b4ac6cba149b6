"""The server's own tokenizer handle: prompts are tokenized on the event loop, never on the engine thread.

It holds a private copy of the engine's Hugging Face tokenizer, so encoding here never races with the
engine thread's incremental detokenization.
"""

from __future__ import annotations

import copy
import functools

from pageant.engine.server.protocol import ChatMessage
from pageant.engine.server.validation import APIError


class ServerTokenizer:
    """Encode/decode and chat templating for request handling (one instance per app)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.bos_token = getattr(hf_tokenizer, "bos_token", None)
        self._token_str = functools.lru_cache(maxsize=65536)(self._decode_one)

    @classmethod
    def from_engine(cls, engine) -> "ServerTokenizer":
        tok = engine.tokenizer
        hf = getattr(tok, "hf_tokenizer", tok)
        try:
            hf = copy.deepcopy(hf)
        except Exception:  # noqa: BLE001 - a shared fast tokenizer is still safe for plain encode/decode
            pass
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def _decode_one(self, token_id: int) -> str:
        return self.hf.decode([token_id])

    def token_str(self, token_id: int) -> str:
        return self._token_str(token_id)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
        msgs = []
        for m in messages:
            if m.content is None:
                content = ""
            elif isinstance(m.content, str):
                content = m.content
            else:
                content = "".join(part.text for part in m.content)
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        if not getattr(self.hf, "chat_template", None):
            raise APIError(400, "this model has no chat template: use /v1/completions", param="messages")
        try:
            return self.hf.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are the caller's input
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt)
        # Templates that write the bos token themselves must not get a second one.
        add_special = not (self.bos_token and text.startswith(self.bos_token))
        return self.encode(text, add_special_tokens=add_special)
