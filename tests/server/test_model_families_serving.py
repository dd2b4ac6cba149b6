"""``pageant serve --model <dir>`` serves every model family: a real server per family, the real
openai client, greedy text equal to the offline engine's (itself equal to transformers), streamed
chat, and /metrics counting the tokens."""

from __future__ import annotations

import openai
import pytest

from pageant.engine import LLM, SamplingParams

FAMILIES = ["gpt_neox", "falcon", "mixtral", "gemma2", "phi3"]
PROMPT = "The quick brown fox"


@pytest.mark.parametrize("arch", FAMILIES)
def test_serve_family(make_checkpoint, server_process, tmp_path, arch):
    path = make_checkpoint(arch)
    offline = LLM(model=path).generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                                       use_tqdm=False)[0].outputs[0].text
    server = server_process(["--model", path, "--served-model-name", arch, "--uvicorn-log-level", "warning"],
                            tmp_path / "server.log")
    try:
        server.wait_ready()
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == [arch]
        resp = client.completions.create(model=arch, prompt=PROMPT, max_tokens=8, temperature=0,
                                         extra_body={"ignore_eos": True})
        assert resp.choices[0].text == offline and resp.usage.completion_tokens == 8
        chunks = client.chat.completions.create(model=arch, messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=5, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed
        assert server.metric("vllm:generation_tokens_total") >= 13
    finally:
        server.stop()
