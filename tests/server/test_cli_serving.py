"""`pageant serve` flags seen through real servers: the positional MODEL, --chat-template (a file and
inline), --generation-config (auto vs vllm), --enable-log-requests and the startup log.

Two servers serve the same copy of the tiny checkpoint whose generation_config.json asks for greedy
decoding and at most 3 new tokens:

- ``auto_server``: the positional MODEL, the default --generation-config auto, --chat-template from a
  file, --enable-log-requests, no API key;
- ``vllm_server``: --model, --generation-config vllm, an inline --chat-template, an API key, requests
  not logged.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import httpx
import pytest

API_KEY = "cli-serving-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FILE_TEMPLATE = ("{% for m in messages %}{{ '[' + m['role'] + '] ' + m['content'] + '\n' }}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}")
INLINE_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper + ': ' + m['content'] + ' | ' }}{% endfor %}"
                   "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
COMMON = ("--max-model-len", "256", "--num-kv-blocks", "64", "--uvicorn-log-level", "warning")


@pytest.fixture(scope="module")
def generation_checkpoint(tmp_path_factory, tiny_checkpoint) -> pathlib.Path:
    """A copy of the tiny checkpoint whose generation_config.json sets temperature 0 and max_new_tokens 3."""
    path = tmp_path_factory.mktemp("gen") / "gen-ckpt"
    shutil.copytree(tiny_checkpoint, path)
    gen = path / "generation_config.json"
    config = json.loads(gen.read_text()) if gen.is_file() else {}
    gen.write_text(json.dumps({**config, "temperature": 0.0, "max_new_tokens": 3}))
    return path


@pytest.fixture(scope="module")
def auto_server(serve, generation_checkpoint, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "chat.jinja"
    template.write_text(FILE_TEMPLATE)
    return serve(str(generation_checkpoint), "--chat-template", str(template), "--enable-log-requests", *COMMON,
                 model=False)


@pytest.fixture(scope="module")
def vllm_server(serve, generation_checkpoint):
    return serve("--model", str(generation_checkpoint), "--generation-config", "vllm", "--chat-template",
                 INLINE_TEMPLATE, "--api-key", API_KEY, *COMMON, model=False)


def _complete(server, headers=None, **body) -> dict:
    body = {"prompt": "Once upon a time", "ignore_eos": True, **body}
    resp = httpx.post(f"{server.base_url}/v1/completions", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_positional_model_is_served_and_the_startup_log_says_where(auto_server, vllm_server):
    models = httpx.get(f"{auto_server.base_url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["gen-ckpt"]
    assert f"serving model 'gen-ckpt' at http://127.0.0.1:{auto_server.port}/v1 (API key not required)" \
        in auto_server.output()
    assert f"serving model 'gen-ckpt' at http://127.0.0.1:{vllm_server.port}/v1 (API key required)" \
        in vllm_server.output()
    assert "default sampling parameters from the generation config" in auto_server.output()
    assert "default sampling parameters" not in vllm_server.output()


def test_generation_config_auto_sets_defaults_and_vllm_ignores_them(auto_server, vllm_server):
    # max_new_tokens: a cap on every request (vLLM's semantics) with auto; the built-in 16 with vllm
    assert _complete(auto_server)["usage"]["completion_tokens"] == 3
    assert _complete(auto_server, max_tokens=10)["usage"]["completion_tokens"] == 3
    assert _complete(vllm_server, AUTH)["usage"]["completion_tokens"] == 16
    assert _complete(vllm_server, AUTH, max_tokens=10)["usage"]["completion_tokens"] == 10
    chat = httpx.post(f"{auto_server.base_url}/v1/chat/completions", json={"messages": MESSAGES, "ignore_eos": True},
                      timeout=60).json()
    assert chat["usage"]["completion_tokens"] == 3
    # temperature 0 from the generation config where the request sets none; the request's own wins
    log = auto_server.output()
    assert re.search(r"request cmpl-\S+: .*temperature=0\.0.*max_tokens=3", log)
    _complete(auto_server, temperature=0.7, prompt="a different prompt")
    assert re.search(r"request cmpl-\S+: .*temperature=0\.7.*max_tokens=3.*'a different prompt'", auto_server.output())


def test_requests_are_logged_only_with_enable_log_requests(auto_server, vllm_server):
    _complete(auto_server, prompt="log me please")
    _complete(vllm_server, AUTH, prompt="do not log me")
    line = next(x for x in auto_server.output().splitlines() if "'log me please'" in x)
    assert re.search(r"request cmpl-\S+: prompt_tokens=\d+ lora=None params=SamplingParams\(", line)
    assert "do not log me" not in vllm_server.output() and "prompt_tokens=" not in vllm_server.output()


@pytest.mark.parametrize("which", ["file", "inline"])
def test_chat_template_replaces_the_tokenizers(which, auto_server, vllm_server, tiny_checkpoint):
    from transformers import AutoTokenizer

    server, template, headers = ((auto_server, FILE_TEMPLATE, None) if which == "file"
                                 else (vllm_server, INLINE_TEMPLATE, AUTH))
    tok = AutoTokenizer.from_pretrained(tiny_checkpoint)
    text = tok.apply_chat_template(MESSAGES, chat_template=template, tokenize=False, add_generation_prompt=True)
    default_text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text != default_text
    expected = tok.encode(text)
    got = httpx.post(f"{server.base_url}/tokenize", json={"messages": MESSAGES}, headers=headers, timeout=30).json()
    assert got["tokens"] == expected
    assert got["tokens"] != tok.encode(default_text)
    chat = httpx.post(f"{server.base_url}/v1/chat/completions", headers=headers, timeout=60,
                      json={"messages": MESSAGES, "max_tokens": 2}).json()
    assert chat["usage"]["prompt_tokens"] == len(expected)
