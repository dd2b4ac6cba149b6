"""The server's own tokenizer handle: prompts are tokenized on a small thread pool, never on the
event loop (a multi-megabyte prompt takes seconds, and /health must answer meanwhile) nor on the
engine thread.

It holds a private copy of the engine's Hugging Face tokenizer, so encoding here never races with the
engine thread's incremental detokenization; each pool thread works on its own copy (Hugging Face fast
tokenizers release the GIL while they encode, so the event loop keeps running). The ``a*`` methods
(``aencode``, ``adecode``, ``achat_ids``) are the ones request handlers use.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import functools
import os
import threading

from pageant.engine.server.protocol import ChatMessage
from pageant.engine.server.validation import APIError


class ServerTokenizer:
    """Encode/decode and chat templating for request handling (one instance per app).

    ``chat_template``: a Jinja template used instead of the tokenizer's own (``pageant serve
    --chat-template``); None: the tokenizer's."""

    def __init__(self, hf_tokenizer, chat_template: str | None = None, num_threads: int | None = None):
        self.hf = hf_tokenizer
        self.chat_template = chat_template
        self.bos_token = getattr(hf_tokenizer, "bos_token", None)
        self._token_str = functools.lru_cache(maxsize=65536)(self._decode_one)
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        self._local = threading.local()  # a pool thread's own tokenizer copy
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.num_threads, thread_name_prefix="pageant-tokenize", initializer=self._init_thread)

    def _init_thread(self) -> None:
        try:
            self._local.hf = copy.deepcopy(self.hf)
        except Exception:  # noqa: BLE001 - a shared fast tokenizer is still safe for plain encode/decode
            self._local.hf = self.hf

    def _current(self):
        """The tokenizer of the calling thread: a pool thread's copy, else the handle's own."""
        hf = getattr(self._local, "hf", None)
        return self.hf if hf is None else hf

    async def run(self, fn, /, *args, **kwargs):
        """``fn(*args, **kwargs)`` on the tokenizer pool (off the event loop)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                functools.partial(fn, *args, **kwargs))

    async def aencode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.run(self.encode, text, add_special_tokens)

    async def adecode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return await self.run(self.decode, ids, skip_special_tokens)

    async def achat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                        tools: list[dict] | None = None) -> list[int]:
        return await self.run(self.chat_ids, messages, add_generation_prompt, tools)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

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
        return list(self._current().encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._current().decode(ids, skip_special_tokens=skip_special_tokens)

    def _decode_one(self, token_id: int) -> str:
        return self.hf.decode([token_id])

    def token_str(self, token_id: int) -> str:
        return self._token_str(token_id)

    def render_chat(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The prompt text; ``tools`` (OpenAI tool definitions) and the history's tool calls and tool
        results go to the template as Hugging Face templates expect them (call arguments as dicts)."""
        msgs = []
        for m in messages:
            if m.content is None:
                content = ""
            elif isinstance(m.content, str):
                content = m.content
            else:
                content = "".join(part.text for part in m.content)
            msg = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": _arguments(c.function.arguments)}} for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                msg["name"] = m.name
            msgs.append(msg)
        if not (self.chat_template or getattr(self.hf, "chat_template", None)):
            raise APIError(400, "this model has no chat template: use /v1/completions or pass --chat-template",
                           param="messages")
        try:
            return self._current().apply_chat_template(msgs, chat_template=self.chat_template, tools=tools,
                                                       add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - template errors (e.g. role order) are the caller's input
            raise APIError(400, f"the chat template rejected the messages: {exc}", param="messages") from None

    def chat_ids(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                 tools: list[dict] | None = None) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt, tools)
        # Templates that write the bos token themselves must not get a second one.
        add_special = not (self.bos_token and text.startswith(self.bos_token))
        return self.encode(text, add_special_tokens=add_special)


def _arguments(text: str):
    """A history tool call's arguments for the template: the JSON object (else the text as sent)."""
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text
