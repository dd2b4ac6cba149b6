"""Images through the OpenAI API: ``pageant serve`` on the tiny LLaVA checkpoint and the real openai
client. ``image_url`` parts as data URLs (PNG, JPEG, WebP) and from an allowed host give the offline
engine's greedy text (itself Hugging Face's, see test_llava.py); bad images get a 400 with a clear
message and never reach the engine (its prompt-token counter does not move)."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pageant.engine import LLM, LLMEngine, SamplingParams
from pageant.engine.server.app import ServerConfig, build_app

QUESTION = "What is in this picture?"


def _b64(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _messages(*urls: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [{"type": "text", "text": QUESTION + " "}, *parts]}]


@pytest.fixture(scope="module")
def image_host(images):
    png = _png(images[2])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/image.png"
    server.shutdown()


@pytest.fixture(scope="module")
def server(llava_path, server_process, tmp_path_factory):
    proc = server_process(["--model", llava_path, "--served-model-name", "llava", "--uvicorn-log-level", "warning",
                           "--limit-mm-per-prompt", '{"image": 2}', "--allowed-media-domains", "127.0.0.1"],
                          tmp_path_factory.mktemp("serve") / "server.log")
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0, timeout=60)


def _offline(llava_path, imgs) -> str:
    prompt = f"<|user|>\n{QUESTION} " + "<image>" * len(imgs) + "</s>\n<|assistant|>\n"
    out = LLM(llava_path).generate({"prompt": prompt, "multi_modal_data": {"image": imgs}},
                                   SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    return out[0].outputs[0].text


def _chat(client, messages, **kw):
    return client.chat.completions.create(model="llava", messages=messages, max_tokens=8, temperature=0,
                                          extra_body={"ignore_eos": True}, **kw)


def test_image_chat_equals_offline(client, data_url, images, llava_path, image_host):
    one = _offline(llava_path, [images[2]])
    for fmt in ("PNG", "WEBP"):  # lossless: the same pixels as offline
        resp = _chat(client, _messages(data_url(images[2], fmt)))
        assert resp.choices[0].message.content == one and resp.usage.completion_tokens == 8
    assert _chat(client, _messages(image_host)).choices[0].message.content == one  # fetched from the allowed host
    jpeg = _chat(client, _messages(data_url(images[2], "JPEG")))
    assert jpeg.usage.completion_tokens == 8 and jpeg.usage.prompt_tokens == _chat(
        client, _messages(data_url(images[2], "PNG"))).usage.prompt_tokens
    two = _chat(client, _messages(data_url(images[0], "PNG"), data_url(images[1], "PNG")), stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in two if c.choices) == _offline(
        llava_path, [images[0], images[1]])


def test_bad_images_get_400_and_never_reach_the_engine(client, server, data_url, images, image_host):
    before = server.metric("vllm:prompt_tokens_total")
    bomb = _b64(_png(Image.new("RGB", (5000, 4000))))
    gif = io.BytesIO()
    images[0].save(gif, format="GIF")
    cases = [
        (_messages(_b64(b"\x89PNG but not really")), "could not be decoded"),
        (_messages(_b64(gif.getvalue(), "image/gif")), "unsupported image format GIF"),
        (_messages(bomb), "20000000 pixels; at most 16777216"),
        (_messages(*[data_url(images[0], "PNG")] * 3), "at most 2 image"),
        (_messages(image_host.replace("127.0.0.1", "localhost")), "'localhost' are not allowed"),
        (_messages("ftp://127.0.0.1/x.png"), "unsupported image URL scheme"),
    ]
    for messages, message in cases:
        with pytest.raises(openai.BadRequestError, match=message) as err:
            _chat(client, messages)
        assert err.value.body["param"] == "messages"
    assert server.metric("vllm:prompt_tokens_total") == before


def test_text_only_model_refuses_images(make_checkpoint, data_url, images):
    engine = LLMEngine.from_kwargs(make_checkpoint())
    with TestClient(build_app(engine, ServerConfig(log_requests=False))) as tc:
        body = {"messages": _messages(data_url(images[0], "PNG")), "max_tokens": 4}
        resp = tc.post("/v1/chat/completions", json=body)
        assert resp.status_code == 400 and "text-only" in resp.json()["error"]["message"]
        resp = tc.post("/tokenize", json={"messages": body["messages"]})
        assert resp.status_code == 400 and "image_url" in resp.json()["error"]["message"]
        assert tc.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                     "max_tokens": 2}).status_code == 200
