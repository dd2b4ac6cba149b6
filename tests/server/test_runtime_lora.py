"""Runtime LoRA adapters over HTTP (`POST /v1/load_lora_adapter`, `/v1/unload_lora_adapter`) against a
real `pageant serve`, with the real `openai` client for generation; and how they live beside the
watched `--lora-modules-file`."""

from __future__ import annotations

import json
import pathlib
import threading
import time

import httpx
import openai
import pytest

PROMPT = "The assert statement is"


def _models(server) -> list[tuple[str, str | None]]:
    return [(m["id"], m["parent"]) for m in httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"]]


def _load(server, name, path) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path},
                      timeout=60)


def _unload(server, name) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=120)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def _greedy(server, model: str, max_tokens: int = 12) -> str:
    out = _client(server).completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                             extra_body={"ignore_eos": True})
    return out.choices[0].text


def _offline_text(checkpoint: str, adapter: str) -> str:
    from pageant.engine import LLM, LoRARequest, SamplingParams

    llm = LLM(model=checkpoint, max_model_len=256, num_kv_blocks=64, enable_lora=True, max_loras=2, max_lora_rank=8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    return llm.generate(PROMPT, params, use_tqdm=False, lora_request=LoRARequest("offline", 1, adapter))[0].outputs[0].text


@pytest.fixture(scope="module")
def setup(serve, make_server_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-root")
    paths = {"one": make_server_adapter(21, root), "two": make_server_adapter(22, root),
             "outside": make_server_adapter(23)}
    adapters_file = tmp_path_factory.mktemp("runtime-cfg") / "adapters.json"
    adapters_file.write_text(json.dumps({"adapters": [{"name": "filed", "path": paths["two"]}]}))
    server = serve("--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--allowed-lora-root", str(root),
                   "--lora-modules-file", str(adapters_file), "--served-model-name", "tiny", "--max-model-len", "256",
                   "--num-kv-blocks", "64", "--enable-prefix-caching", "--uvicorn-log-level", "warning",
                   "--disable-log-requests")
    return server, root, adapters_file, paths


def test_load_serves_adapter_like_offline_and_unload_removes_it(setup, tiny_checkpoint):
    server, root, _, paths = setup
    assert _models(server) == [("tiny", None), ("filed", "tiny")]
    base = _greedy(server, "tiny")
    r = _load(server, "alpha", paths["one"])
    assert r.status_code == 200, r.text
    assert r.text == "Success: LoRA adapter 'alpha' added successfully."
    assert _models(server) == [("tiny", None), ("filed", "tiny"), ("alpha", "tiny")]
    assert [m.id for m in _client(server).models.list()] == ["tiny", "filed", "alpha"]
    with_alpha = _greedy(server, "alpha")
    assert with_alpha != base
    assert with_alpha == _offline_text(str(tiny_checkpoint), paths["one"])
    chat = _client(server).chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=3, temperature=0)
    assert chat.model == "alpha"

    # a relative path counts from --allowed-lora-root
    r = _load(server, "alpha-rel", pathlib.Path(paths["one"]).name)
    assert r.status_code == 200, r.text
    assert _greedy(server, "alpha-rel") == with_alpha

    for name in ("alpha", "alpha-rel"):
        r = _unload(server, name)
        assert r.status_code == 200, r.text
        assert r.text == f"Success: LoRA adapter '{name}' removed successfully."
    assert _models(server) == [("tiny", None), ("filed", "tiny")]
    with pytest.raises(openai.NotFoundError) as err:
        _greedy(server, "alpha")
    assert err.value.body["code"] == "model_not_found"
    r = _unload(server, "alpha")
    assert r.status_code == 404 and r.json()["error"]["code"] == "lora_adapter_not_found"
    assert _greedy(server, "tiny") == base


@pytest.fixture(scope="module")
def bad_adapters(setup, tiny_checkpoint):
    """name -> lora_path of adapters the server must refuse (all under or pointing out of the root)."""
    import torch
    from safetensors.torch import load_file, save_file

    from pageant.engine.adapters.testing import build_lora_adapter

    _, root, _, paths = setup
    outside = pathlib.Path(paths["outside"])
    (root / "empty").mkdir()
    (root / "config-only").mkdir()
    (root / "config-only" / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (root / "link-out").symlink_to(outside, target_is_directory=True)
    (root / "file-link-out").mkdir()
    (root / "file-link-out" / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (root / "file-link-out" / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")
    build_lora_adapter(tiny_checkpoint, root / "rank-16", r=16)
    lacking = build_lora_adapter(tiny_checkpoint, root / "targets-c-attn", r=4)
    cfg = json.loads((lacking / "adapter_config.json").read_text())
    (lacking / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "c_attn"]}))
    weights_lacking = build_lora_adapter(tiny_checkpoint, root / "weights-c-attn", r=4)
    tensors = load_file(str(weights_lacking / "adapter_model.safetensors"))
    tensors = {k.replace("self_attn.q_proj", "self_attn.c_attn"): v for k, v in tensors.items()}
    save_file(tensors, str(weights_lacking / "adapter_model.safetensors"))
    wrong_shape = build_lora_adapter(tiny_checkpoint, root / "wrong-shape", r=4)
    tensors = load_file(str(wrong_shape / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.randn(4, tensors[key].shape[1] * 2)  # built for a model twice as wide
    save_file(tensors, str(wrong_shape / "adapter_model.safetensors"))
    dotdot = f"{root}/../{outside.parent.name}/{outside.name}"
    return {
        "no such folder": str(root / "nope"),
        "empty folder": str(root / "empty"),
        "no weights file": str(root / "config-only"),
        "absolute path outside the root": str(outside),
        "dot-dot out of the root": dotdot,
        "relative dot-dot out of the root": f"../{outside.parent.name}/{outside.name}",
        "folder symlink out of the root": str(root / "link-out"),
        "file symlink out of the root": str(root / "file-link-out"),
        "rank above --max-lora-rank": str(root / "rank-16"),
        "target module the model lacks (config)": str(lacking),
        "target module the model lacks (weights)": str(weights_lacking),
        "shape does not match the base model": str(wrong_shape),
    }


def test_bad_adapters_are_refused_with_400_and_load_nothing(setup, bad_adapters):
    server, _, _, paths = setup
    before = _models(server)
    for why, path in bad_adapters.items():
        r = _load(server, "bad", path)
        assert r.status_code == 400, (why, r.text)
        assert r.json()["error"]["type"] == "BadRequestError", why
        assert _models(server) == before, why
    assert "outside the allowed adapter root" in _load(server, "bad", bad_adapters["dot-dot out of the root"]).text
    assert "max_lora_rank" in _load(server, "bad", bad_adapters["rank above --max-lora-rank"]).text
    bad_names = {"the base model's name": "tiny", "a loaded adapter's name (from the file)": "filed",
                 "an empty name": "", "a name with spaces": "my adapter"}
    for why, name in bad_names.items():
        r = _load(server, name, paths["one"])
        assert r.status_code == 400, (why, r.text)
        assert _models(server) == before, why
    assert "already been loaded" in _load(server, "filed", paths["one"]).text
    for body in ({"lora_name": "x"}, {"lora_path": paths["one"]}, {"lora_name": 5, "lora_path": paths["one"]}):
        r = httpx.post(f"{server.base_url}/v1/load_lora_adapter", json=body, timeout=30)
        assert r.status_code == 422 and "error" in r.json(), r.text
    # nothing was half-registered: the refused name loads fine with a good adapter
    assert _load(server, "bad", paths["one"]).status_code == 200
    assert _unload(server, "bad").status_code == 200
    assert _models(server) == before
    assert httpx.get(f"{server.base_url}/health").status_code == 200


def test_unload_waits_for_the_adapters_running_stream(setup):
    server, _, _, paths = setup
    assert _load(server, "waiter", paths["one"]).status_code == 200
    events: dict[str, float] = {}
    chunks: list = []

    def consume():
        stream = _client(server).completions.create(model="waiter", prompt=PROMPT, max_tokens=96, temperature=0,
                                                    stream=True, stream_options={"include_usage": True},
                                                    extra_body={"ignore_eos": True})
        for chunk in stream:
            events.setdefault("first", time.monotonic())
            chunks.append(chunk)
        events["done"] = time.monotonic()

    reader = threading.Thread(target=consume)
    reader.start()
    while "first" not in events and reader.is_alive():
        time.sleep(0.005)
    events["unload_called"] = time.monotonic()
    unloaded: list[httpx.Response] = []
    unloader = threading.Thread(target=lambda: unloaded.append(_unload(server, "waiter")))
    unloader.start()
    while "waiter" in dict(_models(server)) and unloader.is_alive():
        time.sleep(0.005)
    during = httpx.post(f"{server.base_url}/v1/completions", json={"model": "waiter", "prompt": "x", "max_tokens": 2},
                        timeout=30)
    reader.join(120)
    unloader.join(120)
    assert events["unload_called"] < events["done"], "the stream ended before the unload began: nothing was tested"
    assert during.status_code == 404  # unroutable from the moment the unload began
    assert unloaded[0].status_code == 200, unloaded[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"  # not cut off
    assert chunks[-1].usage.completion_tokens == 96
    assert "waiter" not in dict(_models(server))


def _write(adapters_file, entries: dict[str, str]) -> None:
    adapters_file.write_text(json.dumps({"adapters": [{"name": n, "path": p} for n, p in entries.items()]}))


def _wait_models(server, want: list[str], timeout: float = 20) -> list[str]:
    deadline = time.monotonic() + timeout
    while (got := [m for m, _ in _models(server)]) != want and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def test_file_watcher_and_http_endpoints_do_not_fight(setup):
    server, _, adapters_file, paths = setup
    one, two = paths["one"], paths["two"]
    assert _load(server, "api1", one).status_code == 200
    # the file drops `filed` and adds `other`: the adapter loaded over HTTP stays
    _write(adapters_file, {"other": two})
    assert _wait_models(server, ["tiny", "api1", "other"]) == ["tiny", "api1", "other"]
    one_text = _greedy(server, "api1")
    # the file names `api1` with another path: an error, and the HTTP adapter stays as it was ...
    _write(adapters_file, {"other": two, "api1": two})
    deadline = time.monotonic() + 20
    while "taken by an adapter loaded over the HTTP API" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "taken by an adapter loaded over the HTTP API" in server.output()
    assert _greedy(server, "api1") == one_text
    # ... until it is unloaded over HTTP: then the file's `api1` is loaded at once
    assert _unload(server, "api1").status_code == 200
    assert [m for m, _ in _models(server)] == ["tiny", "other", "api1"]
    two_text = _greedy(server, "other")
    assert _greedy(server, "api1") == two_text != one_text

    # a file adapter unloaded over HTTP (the operator does not wait for kubelet to refresh the file)
    # stays unloaded while the file's content is unchanged, even across polls and rewrites
    assert _unload(server, "other").status_code == 200
    assert [m for m, _ in _models(server)] == ["tiny", "api1"]
    _write(adapters_file, {"other": two, "api1": two})  # same content, new mtime: polled again
    time.sleep(2.5)  # more than one poll (2 s)
    assert [m for m, _ in _models(server)] == ["tiny", "api1"]
    _write(adapters_file, {"api1": two})  # the refreshed file no longer lists it
    _write(adapters_file, {"api1": two, "other": two})  # other bytes than when it was unloaded: loaded again
    assert _wait_models(server, ["tiny", "api1", "other"]) == ["tiny", "api1", "other"]

    # an HTTP adapter that the file then lists with the same path is adopted: the file owns it
    assert _load(server, "adopted", one).status_code == 200
    _write(adapters_file, {"api1": two, "other": two, "adopted": one})
    time.sleep(2.5)
    assert _greedy(server, "adopted") == one_text
    _write(adapters_file, {"api1": two, "other": two})
    assert _wait_models(server, ["tiny", "api1", "other"]) == ["tiny", "api1", "other"]


def test_unload_refused_with_409_while_a_long_stream_runs(serve, make_server_adapter, tmp_path_factory):
    """With --lora-unload-timeout 0.3 an unload that would cut off a running request is refused (409)
    and the adapter is served as before; once the request ends (here: the client leaves) it unloads."""
    root = tmp_path_factory.mktemp("runtime-409")
    adapter = make_server_adapter(24, root)
    server = serve("--enable-lora", "--allowed-lora-root", str(root), "--lora-unload-timeout", "0.3",
                   "--served-model-name", "tiny", "--max-model-len", "512", "--num-kv-blocks", "64",
                   "--uvicorn-log-level", "warning", "--disable-log-requests")
    assert _load(server, "long", adapter).status_code == 200
    stream = _client(server).completions.create(model="long", prompt=PROMPT, max_tokens=480, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
    chunks = iter(stream)
    first = next(chunks)
    assert first.choices[0].finish_reason is None
    started = time.monotonic()
    r = _unload(server, "long")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "lora_adapter_in_use" and r.json()["error"]["type"] == "ConflictError"
    assert time.monotonic() - started >= 0.3  # it waited for the timeout first
    assert ("long", "tiny") in _models(server)  # still served
    assert _greedy(server, "long", 2)
    # the stream was not disturbed: it is still running and goes on
    more = [next(chunks) for _ in range(3)]
    assert all(c.choices[0].finish_reason is None for c in more), "the stream ended: the 409 was not tested"
    stream.close()  # the client leaves: its request is aborted
    deadline = time.monotonic() + 30
    while (r := _unload(server, "long")).status_code == 409 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert r.status_code == 200, r.text
    assert ("long", "tiny") not in _models(server)


def test_runtime_endpoints_need_enable_lora(tiny_checkpoint, make_server_adapter):
    from fastapi.testclient import TestClient

    from pageant.engine import LLMEngine
    from pageant.engine.server.app import ServerConfig, build_app

    engine = LLMEngine.from_kwargs(model=str(tiny_checkpoint), max_model_len=128, num_kv_blocks=16)
    with TestClient(build_app(engine, ServerConfig(log_requests=False))) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": make_server_adapter(25)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "lora_not_enabled"
        assert "--enable-lora" in r.json()["error"]["message"]
        r = client.post("/v1/unload_lora_adapter", json={"lora_name": "a"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "lora_not_enabled"
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [engine.model_name]


def test_request_routed_to_an_adapter_unloaded_before_admission_is_refused(tiny_checkpoint, make_server_adapter):
    """The engine would load an unknown adapter again by itself (an offline convenience); the
    server's engine thread refuses instead, so an unload can never be undone behind its back."""
    import asyncio

    from pageant.engine import LLMEngine, LoRARequest, SamplingParams
    from pageant.engine.server.async_engine import AdapterGoneError, AsyncEngine

    engine = LLMEngine.from_kwargs(model=str(tiny_checkpoint), max_model_len=128, num_kv_blocks=16, enable_lora=True,
                                   max_loras=1, max_lora_rank=8)
    lora = LoRARequest("gone", 1, make_server_adapter(26))

    async def scenario():
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            assert await async_engine.call(lambda e: e.add_lora(lora)) is True
            assert await async_engine.call(lambda e: e.remove_lora("gone")) is True
            with pytest.raises(AdapterGoneError):
                await async_engine.add("r1", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=2),
                                       lora_request=lora)
            return await async_engine.call(lambda e: e.list_loras())
        finally:
            async_engine.stop()

    assert asyncio.run(scenario()) == []


def test_without_allowed_root_any_local_folder_loads_with_the_api_key(tiny_checkpoint, make_server_adapter, tmp_path):
    from fastapi.testclient import TestClient

    from pageant.engine import LLMEngine
    from pageant.engine.server.app import ServerConfig, build_app

    engine = LLMEngine.from_kwargs(model=str(tiny_checkpoint), max_model_len=128, num_kv_blocks=16, enable_lora=True,
                                   max_loras=1, max_lora_rank=8)
    config = ServerConfig(log_requests=False, max_loras=1, api_keys=["k"])
    with TestClient(build_app(engine, config), headers={"Authorization": "Bearer k"}) as client:
        path = make_server_adapter(27)
        body = {"lora_name": "local", "lora_path": path}
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):  # the API key guards them too
            assert client.post(route, json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 200, r.text
        assert client.get("/v1/models").json()["data"][1] == {**client.get("/v1/models").json()["data"][1],
                                                               "id": "local", "root": path}
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "missing", "lora_path": str(tmp_path / "nope")})
        assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "local", "prompt": "x", "max_tokens": 2}).status_code == 200
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "local"}).status_code == 200
        assert len(client.get("/v1/models").json()["data"]) == 1
