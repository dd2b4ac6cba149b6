"""Live LoRA adapters through `--lora-modules-file`: listed, routed by `model`, swapped without a restart."""

from __future__ import annotations

import json
import time

import httpx
import pytest

PROMPT = "The assert statement is"


def _greedy(server, model: str) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/completions", timeout=60,
                      json={"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0, "ignore_eos": True})


def _model_ids(server) -> list[str]:
    return [m["id"] for m in httpx.get(f"{server.base_url}/v1/models").json()["data"]]


def _offline_lora_text(checkpoint: str, adapter: str) -> str:
    from pageant.engine import LLMEngine, LoRARequest, SamplingParams

    engine = LLMEngine.from_kwargs(model=checkpoint, max_model_len=256, num_kv_blocks=64, enable_lora=True,
                                   max_loras=2)
    engine.add_request("r", PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       lora_request=LoRARequest("x", 1, adapter))
    text = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                text = out.outputs[0].text
    return text


@pytest.fixture(scope="module")
def lora_setup(serve, make_server_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-root")
    alpha, beta = make_server_adapter(1, root), make_server_adapter(2, root)
    outside = make_server_adapter(3)
    adapters_file = tmp_path_factory.mktemp("cfg") / "adapters.json"
    adapters_file.write_text(json.dumps({"adapters": [{"name": "alpha", "path": alpha}]}))
    server = serve("--enable-lora", "--max-loras", "2", "--lora-modules-file", str(adapters_file),
                   "--allowed-lora-root", str(root), "--served-model-name", "tiny", "--max-model-len", "256",
                   "--num-kv-blocks", "64", "--uvicorn-log-level", "warning", "--disable-log-requests")
    return server, adapters_file, {"alpha": alpha, "beta": beta, "outside": outside}


def test_adapter_is_listed_and_routed(lora_setup, tiny_checkpoint):
    server, _, paths = lora_setup
    models = httpx.get(f"{server.base_url}/v1/models").json()["data"]
    assert [(m["id"], m["parent"]) for m in models] == [("tiny", None), ("alpha", "tiny")]
    base = _greedy(server, "tiny").json()["choices"][0]["text"]
    with_alpha = _greedy(server, "alpha")
    assert with_alpha.status_code == 200 and with_alpha.json()["model"] == "alpha"
    assert with_alpha.json()["choices"][0]["text"] != base
    assert with_alpha.json()["choices"][0]["text"] == _offline_lora_text(str(tiny_checkpoint), paths["alpha"])
    assert server.metric("vllm:lora_requests_info", {"max_lora": "2"}) > 0


def test_adapters_file_change_swaps_adapters_live(lora_setup):
    server, adapters_file, paths = lora_setup
    before = _greedy(server, "alpha").json()["choices"][0]["text"]
    adapters_file.write_text(json.dumps({"adapters": [{"name": "beta", "path": paths["beta"]},
                                                      {"name": "gamma", "path": paths["alpha"]}]}))
    deadline = time.monotonic() + 20
    while _model_ids(server) != ["tiny", "beta", "gamma"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _model_ids(server) == ["tiny", "beta", "gamma"]
    gone = _greedy(server, "alpha")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert _greedy(server, "gamma").json()["choices"][0]["text"] == before  # same weights, new name
    assert _greedy(server, "beta").json()["choices"][0]["text"] != before


def test_adapter_outside_root_in_file_is_refused_and_server_keeps_serving(lora_setup):
    server, adapters_file, paths = lora_setup
    adapters_file.write_text(json.dumps({"adapters": [{"name": "beta", "path": paths["beta"]},
                                                      {"name": "evil", "path": paths["outside"]}]}))
    deadline = time.monotonic() + 20
    while "outside --allowed-lora-root" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "outside --allowed-lora-root" in server.output()
    assert "evil" not in _model_ids(server)
    assert _greedy(server, "beta").status_code == 200
    assert httpx.get(f"{server.base_url}/health").status_code == 200
