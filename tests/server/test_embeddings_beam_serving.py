"""/v1/embeddings on a `pageant serve --runner pooling` server through the real openai client
(equal to transformers' pooled hidden states), and beam search over HTTP (``use_beam_search``),
equal to the offline ``LLM.beam_search``."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

from pageant.engine import LLM, BeamSearchParams

INPUTS = ["The quick brown fox", "jumps over the lazy dog", "a"]


def hf_last_token(path: str, ids: list[list[int]]) -> list[torch.Tensor]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return [F.normalize(model(torch.tensor([x])).last_hidden_state[0, -1], dim=-1) for x in ids]


@pytest.fixture(scope="module")
def pooling_server(serve):
    return serve("--runner", "pooling", "--max-model-len", "64", "--uvicorn-log-level", "warning")


def test_embeddings_equal_transformers(pooling_server, tiny_checkpoint):
    client = openai.OpenAI(base_url=f"{pooling_server.base_url}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    resp = client.embeddings.create(model=model, input=INPUTS)
    llm = LLM(model=tiny_checkpoint)
    ids = [llm.tokenizer.encode(t) for t in INPUTS]
    expected = hf_last_token(tiny_checkpoint, ids)
    assert [d.index for d in resp.data] == [0, 1, 2]
    for d, e in zip(resp.data, expected):
        assert F.cosine_similarity(torch.tensor(d.embedding), e, dim=0) >= 0.9999
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == sum(map(len, ids))
    # token ids in, base64 out (little-endian float32, as OpenAI encodes them)
    raw = httpx.post(f"{pooling_server.base_url}/v1/embeddings",
                     json={"model": model, "input": [ids[0], ids[1]], "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(raw["data"][1]["embedding"]), dtype="<f4")
    assert np.allclose(vec, resp.data[1].embedding, atol=1e-6)
    assert pooling_server.metric("vllm:request_success_total") >= 5


@pytest.mark.parametrize("body, status, text", [
    ({"input": "x", "dimensions": 8}, 400, "Matryoshka"),
    ({"input": [1] * 65}, 400, "context"),
    ({"input": [[1, 2], []]}, 400, "empty"),
    ({"input": ["x"] * 65}, 400, "at most"),
    ({"input": [100000]}, 400, "vocabulary"),
    ({"input": "x", "encoding_format": "int8"}, 422, ""),
])
def test_embedding_errors(pooling_server, body, status, text):
    r = httpx.post(f"{pooling_server.base_url}/v1/embeddings", json=body)
    assert r.status_code == status and text in r.json()["error"]["message"]


def test_generation_is_refused_on_a_pooling_server(pooling_server):
    r = httpx.post(f"{pooling_server.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 400 and "pooling" in r.json()["error"]["message"]


def test_embeddings_need_the_pooling_runner_and_beam_search_over_http(serve, tiny_checkpoint):
    server = serve("--uvicorn-log-level", "warning")
    r = httpx.post(f"{server.base_url}/v1/embeddings", json={"input": "hello"})
    assert r.status_code == 400 and "--runner pooling" in r.json()["error"]["message"]
    # beam search over HTTP on this (generate) server
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
    model = client.models.list().data[0].id
    resp = client.completions.create(model=model, prompt="The quick brown fox", n=3, max_tokens=6, temperature=0,
                                     extra_body={"use_beam_search": True, "ignore_eos": True})
    offline = LLM(model=tiny_checkpoint).beam_search(
        "The quick brown fox", BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))[0]
    assert [c.text for c in resp.choices] == [s.text for s in offline.sequences]
    assert resp.usage.completion_tokens == 18
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=5, extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert len(chat.choices) == 2 and all(c.finish_reason in ("stop", "length") for c in chat.choices)
    for extra, text in (({"temperature": 0.7}, "temperature"), ({"stream": True}, "stream"), ({"n": 11}, "beam width")):
        r = httpx.post(f"{server.base_url}/v1/completions",
                       json={"prompt": "hi", "max_tokens": 3, "use_beam_search": True, **extra})
        assert r.status_code == 400 and text in r.json()["error"]["message"], r.text
