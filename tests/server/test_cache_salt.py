"""`cache_salt` in completions and chat (vLLM's field) against a real `pageant serve` with prefix
caching: requests share cached prefix blocks only when their salts are equal."""

from __future__ import annotations

import httpx
import openai
import pytest

PROMPT = " ".join(["The assert statement is a convenient way to insert debugging assertions."] * 5)


@pytest.fixture(scope="module")
def server(serve):
    return serve("--enable-prefix-caching", "--served-model-name", "tiny", "--max-model-len", "256",
                 "--num-kv-blocks", "64", "--uvicorn-log-level", "warning", "--disable-log-requests")


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


def _hits(server) -> float:
    return server.metric("vllm:prefix_cache_hits_total")


def test_only_equal_salts_share_prefix_cache_hits(server):
    client = _client(server)
    assert httpx.post(f"{server.base_url}/reset_prefix_cache").status_code == 200

    def complete(salt: str | None) -> tuple[str, float]:
        before = _hits(server)
        extra = {} if salt is None else {"cache_salt": salt}
        out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, extra_body=extra)
        return out.choices[0].text, _hits(server) - before

    text, new_hits = complete("tenant-a")
    assert new_hits == 0
    assert complete("tenant-b") == (text, 0)  # same prompt, other salt: no hit
    assert complete(None) == (text, 0)  # no salt is its own namespace too
    same_text, new_hits = complete("tenant-a")
    assert same_text == text and new_hits >= 32  # at least two full 16-token blocks reused
    assert complete("tenant-b")[1] >= 32
    assert complete(None)[1] >= 32

    def chat(salt: str) -> float:
        before = _hits(server)
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=2,
                                       temperature=0, extra_body={"cache_salt": salt})
        return _hits(server) - before

    assert chat("chat-salt") == 0
    assert chat("other-chat-salt") == 0
    assert chat("chat-salt") >= 32


@pytest.mark.parametrize("salt, error", [("", openai.BadRequestError), ("x" * 1025, openai.BadRequestError),
                                         (123, openai.UnprocessableEntityError),
                                         (["a"], openai.UnprocessableEntityError)])
def test_bad_cache_salt_is_refused(server, salt, error):
    client = _client(server)
    with pytest.raises(error) as err:
        client.completions.create(model="tiny", prompt="x", max_tokens=2, extra_body={"cache_salt": salt})
    assert "cache_salt" in str(err.value.body)
    with pytest.raises(error):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                       extra_body={"cache_salt": salt})
    assert httpx.get(f"{server.base_url}/health").status_code == 200
