"""PEFT adapter loading and validation: what loads, what is refused and with what message."""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from pageant.engine.adapters import LoRAAdapterError, LoRAModelSpec, load_peft_adapter
from pageant.engine.config import ModelConfig


def spec_of(ckpt: str) -> LoRAModelSpec:
    return LoRAModelSpec.from_model_config(ModelConfig.from_pretrained(ckpt))


def copy_adapter(src: str, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def load(path, ckpt, max_lora_rank=16, root=None):
    return load_peft_adapter("a", 1, str(path), spec_of(ckpt), max_lora_rank=max_lora_rank, adapter_root=root)


def test_loads_weights_with_scaling(tiny_checkpoint, make_adapter):
    path = make_adapter(tiny_checkpoint, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    adapter = load(path, tiny_checkpoint)
    raw = load_file(os.path.join(path, "adapter_model.safetensors"))
    assert adapter.rank == 4 and adapter.target_modules == ("down_proj", "q_proj", "v_proj")
    assert len(adapter.weights) == 2 * 3  # 2 layers x 3 projections
    a, b = adapter.weights[(1, "down_proj")]
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    torch.testing.assert_close(a, raw[f"{prefix}.lora_A.weight"])
    torch.testing.assert_close(b, raw[f"{prefix}.lora_B.weight"] * (8 / 4))


def test_rslora_scaling(tiny_checkpoint, make_adapter):
    path = make_adapter(tiny_checkpoint, r=4, alpha=8, targets=("o_proj",), use_rslora=True)
    adapter = load(path, tiny_checkpoint)
    raw = load_file(os.path.join(path, "adapter_model.safetensors"))
    _, b = adapter.weights[(0, "o_proj")]
    torch.testing.assert_close(b, raw["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"] * (8 / 2))


def test_rank_pattern(tiny_checkpoint, make_adapter):
    path = make_adapter(tiny_checkpoint, r=4, alpha=8, targets=("q_proj", "k_proj"),
                        rank_pattern={"k_proj": 2}, alpha_pattern={"k_proj": 6})
    adapter = load(path, tiny_checkpoint)
    raw = load_file(os.path.join(path, "adapter_model.safetensors"))
    a, b = adapter.weights[(0, "k_proj")]
    assert a.shape == (2, 64)
    torch.testing.assert_close(b, raw["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] * 3.0)


def test_rank_above_cap(tiny_checkpoint, make_adapter):
    path = make_adapter(tiny_checkpoint, r=8)
    with pytest.raises(LoRAAdapterError, match="above the engine's max_lora_rank=4"):
        load(path, tiny_checkpoint, max_lora_rank=4)


def test_missing_files(tiny_checkpoint, make_adapter, tmp_path):
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        load(tmp_path / "nope", tiny_checkpoint)
    d = copy_adapter(make_adapter(tiny_checkpoint), tmp_path / "a")
    (d / "adapter_model.safetensors").unlink()
    with pytest.raises(LoRAAdapterError, match="has no adapter_model.safetensors"):
        load(d, tiny_checkpoint)
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(LoRAAdapterError, match="pickle weights"):
        load(d, tiny_checkpoint)
    (d / "adapter_config.json").unlink()
    with pytest.raises(LoRAAdapterError, match="has no adapter_config.json"):
        load(d, tiny_checkpoint)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(LoRAAdapterError, match="not valid JSON"):
        load(d, tiny_checkpoint)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(LoRAAdapterError, match="not a folder"):
        load(f, tiny_checkpoint)


def test_corrupt_weights(tiny_checkpoint, make_adapter, tmp_path):
    d = copy_adapter(make_adapter(tiny_checkpoint), tmp_path / "a")
    (d / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage")
    with pytest.raises(LoRAAdapterError, match="cannot be read"):
        load(d, tiny_checkpoint)


def test_paths_outside_root(tiny_checkpoint, make_adapter, adapter_root, tmp_path):
    inside = make_adapter(tiny_checkpoint, root=adapter_root)
    outside = make_adapter(tiny_checkpoint, seed=1)
    name = pathlib.Path(inside).name
    assert load(name, tiny_checkpoint, root=adapter_root).rank == 4  # relative to the root
    assert load(inside, tiny_checkpoint, root=adapter_root).rank == 4  # absolute inside
    for bad in (outside, f"../{pathlib.Path(outside).parent.name}/{pathlib.Path(outside).name}",
                f"{name}/../..", "/etc"):
        with pytest.raises(LoRAAdapterError, match="outside the allowed adapter root"):
            load(bad, tiny_checkpoint, root=adapter_root)
    link = adapter_root / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    with pytest.raises(LoRAAdapterError, match="outside the allowed adapter root"):
        load("link-out", tiny_checkpoint, root=adapter_root)
    # a folder inside the root whose weights file links out
    d = adapter_root / "file-link"
    d.mkdir()
    shutil.copy(pathlib.Path(outside) / "adapter_config.json", d)
    (d / "adapter_model.safetensors").symlink_to(pathlib.Path(outside) / "adapter_model.safetensors")
    with pytest.raises(LoRAAdapterError, match="links outside the allowed adapter root"):
        load("file-link", tiny_checkpoint, root=adapter_root)


def test_target_modules_the_model_lacks(tiny_checkpoint, make_adapter, tmp_path):
    d = copy_adapter(make_adapter(tiny_checkpoint), tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "c_attn"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoRAAdapterError, match=r"targets modules the model lacks.*c_attn"):
        load(d, tiny_checkpoint)
    path = make_adapter(tiny_checkpoint, targets=("q_proj", "lm_head"))
    with pytest.raises(LoRAAdapterError, match="lm_head"):
        load(path, tiny_checkpoint)


def test_shapes_and_layers_must_match_base(tiny_checkpoint, make_checkpoint, make_adapter, tmp_path):
    wider = make_checkpoint("llama", intermediate_size=96)
    path = make_adapter(wider, targets=("gate_proj",))
    with pytest.raises(LoRAAdapterError, match="does not fit the base model"):
        load(path, tiny_checkpoint)
    deeper = make_checkpoint("llama", num_hidden_layers=3)
    path = make_adapter(deeper, targets=("q_proj",))
    with pytest.raises(LoRAAdapterError, match="layer 2, but the model has 2 layers"):
        load(path, tiny_checkpoint)
    # lora_A / lora_B ranks disagreeing with the config
    d = copy_adapter(make_adapter(tiny_checkpoint), tmp_path / "a")
    tensors = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.randn(3, 64)
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError, match="inconsistent with rank 4"):
        load(d, tiny_checkpoint)


@pytest.mark.parametrize("change,message", [
    ({"peft_type": "IA3"}, "only LoRA is supported"),
    ({"use_dora": True}, "DoRA"),
    ({"bias": "all"}, "bias='none'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 0}, "invalid rank"),
    ({"lora_alpha": "x"}, "invalid lora_alpha"),
])
def test_unsupported_config(tiny_checkpoint, make_adapter, tmp_path, change, message):
    d = copy_adapter(make_adapter(tiny_checkpoint), tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(change)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoRAAdapterError, match=message):
        load(d, tiny_checkpoint)


def test_non_finite_weights(tiny_checkpoint, make_adapter, tmp_path):
    d = copy_adapter(make_adapter(tiny_checkpoint), tmp_path / "a")
    tensors = load_file(str(d / "adapter_model.safetensors"))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(d / "adapter_model.safetensors"))
    with pytest.raises(LoRAAdapterError, match="NaN"):
        load(d, tiny_checkpoint)


def test_package_builder_writes_what_peft_loads(tiny_checkpoint, tmp_path):
    """``pageant.engine.adapters.testing.build_lora_adapter`` (no peft needed) loads in PEFT and in
    the engine's loader with the same effect on a projection."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from pageant.engine.adapters.testing import build_lora_adapter

    path = build_lora_adapter(tiny_checkpoint, tmp_path / "a", r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), str(path))
    up = model.base_model.model.model.layers[1].mlp.up_proj
    adapter = load(path, tiny_checkpoint)
    a, b = adapter.weights[(1, "up_proj")]
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(up(x), up.base_layer(x) + x @ a.T @ b.T, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(up(x), up.base_layer(x), atol=1e-3)
    with pytest.raises(ValueError, match="unknown target modules"):
        build_lora_adapter(tiny_checkpoint, tmp_path / "b", target_modules=["lm_head"])


def test_hub_ids_download_only_without_a_root(tiny_checkpoint, make_adapter, adapter_root, tmp_path, monkeypatch):
    """``org/name`` that is no local folder comes from the hub (huggingface_hub is replaced by a
    local stand-in here: no network in tests); with an adapter root, hub ids are refused."""
    import huggingface_hub

    src = make_adapter(tiny_checkpoint, seed=7)
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns, token=None, **_):
        calls.append((repo_id, tuple(allow_patterns)))
        if repo_id != "acme/my-lora":
            raise OSError("404 Client Error: Repository Not Found")
        dst = tmp_path / "hub" / repo_id.replace("/", "--")
        if not dst.exists():
            shutil.copytree(src, dst)
        return str(dst)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert load("acme/my-lora", tiny_checkpoint).rank == 4
    assert calls == [("acme/my-lora", ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"))]
    with pytest.raises(LoRAAdapterError, match="could not be downloaded.*Repository Not Found"):
        load("acme/missing", tiny_checkpoint)
    with pytest.raises(LoRAAdapterError, match="outside the allowed adapter root|does not exist"):
        load("acme/my-lora", tiny_checkpoint, root=adapter_root)
    assert len(calls) == 2
    with pytest.raises(LoRAAdapterError, match="does not exist"):
        load("./acme/other", tiny_checkpoint)  # an explicit relative path is never a hub id
