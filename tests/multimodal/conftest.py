"""Tiny random vision-language checkpoints (LLaVA: CLIP + Llama; Qwen2-VL), test images, and
Hugging Face's greedy tokens for them (``hf_vlm_greedy``), built once per session; torch on one thread."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch


from tests.engine.conftest import _single_torch_thread  # noqa: E402,F401 - autouse here too


@pytest.fixture(scope="session")
def llava_path(tmp_path_factory) -> str:
    from pageant.engine.multimodal.testing import build_llava_checkpoint

    return str(build_llava_checkpoint(tmp_path_factory.mktemp("llava")))


@pytest.fixture(scope="session")
def qwen2_vl_path(tmp_path_factory) -> str:
    from pageant.engine.multimodal.testing import build_qwen2_vl_checkpoint

    return str(build_qwen2_vl_checkpoint(tmp_path_factory.mktemp("qwen2vl"), max_pixels=112 * 112))


@pytest.fixture(scope="session")
def images():
    """Five distinct random RGB images of different sizes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 12 * i, 64 - 4 * i, 3), dtype=np.uint8)) for i in range(5)]


def encode(image, fmt: str) -> str:
    """``image`` as a ``data:image/<fmt>;base64,...`` URL (lossless WebP, so the pixels survive)."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


@pytest.fixture(scope="session")
def data_url():
    return encode


@pytest.fixture(scope="session")
def hf_vlm_greedy():
    """``hf_vlm_greedy(path, prompt, images, max_new) -> token ids`` from transformers' ``generate``."""
    import transformers

    from pageant.engine.multimodal.processor import load_hf_processor

    loaded: dict[str, tuple] = {}

    def run(path: str, prompt: str, images: list, max_new: int = 10) -> list[int]:
        if path not in loaded:
            model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
            loaded[path] = (load_hf_processor(path), model)
        processor, model = loaded[path]
        inputs = processor(text=[prompt], images=images or None, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    return run
