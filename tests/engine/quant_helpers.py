"""Shared helpers of the quantization tests: Hugging Face greedy references (float32 CPU), the
engine's greedy tokens, random prompts, the model's linear layers and edited copies of checkpoints."""

from __future__ import annotations

import json
import pathlib
import random
import shutil

import torch
from safetensors.torch import load_file, save_file

from pageant.engine import LLM, SamplingParams
from pageant.engine.layers.linear import LinearBase

MAX_NEW = 8
SP = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)


def random_prompts(n: int, seed: int, lengths: tuple[int, int] = (1, 40)) -> list[list[int]]:
    """``n`` prompts of BOS then ``randrange(*lengths)`` random token ids in ``[3, 500)``."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(*lengths))] for _ in range(n)]


def hf_model(path: str, dequantize: bool = False, adapter: str | None = None):
    """transformers' float32 model of ``path`` in eval mode: with ``dequantize`` a compressed-tensors
    checkpoint is decompressed to plain weights (no activation fake-quantization); ``adapter``, a
    PEFT adapter directory, is merged into it."""
    from transformers import AutoModelForCausalLM

    kwargs = {}
    if dequantize:
        from transformers import CompressedTensorsConfig

        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def greedy_tokens(model, prompts, cached: bool = True) -> list[list[int]]:
    """A transformers model's ``MAX_NEW`` greedy tokens per prompt: ``generate`` (``cached``) or
    plain argmax steps over the whole sequence (no KV cache: for fake-quantized activations, where
    the cached and full forwards round differently, and where ``generate``'s ``min_new_tokens``
    banning EOS is unwanted)."""
    outs = []
    with torch.no_grad():
        for p in prompts:
            if cached:
                ids = torch.tensor([p])
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW,
                                     do_sample=False, min_new_tokens=MAX_NEW, pad_token_id=0)
                outs.append(gen[0, len(p):].tolist())
                continue
            ids = list(p)
            for _ in range(MAX_NEW):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            outs.append(ids[len(p):])
    return outs


def hf_greedy(path: str, prompts, cached: bool = True, dequantize: bool = False,
              adapter: str | None = None) -> list[list[int]]:
    """``greedy_tokens`` of ``hf_model(path, dequantize, adapter)``."""
    return greedy_tokens(hf_model(path, dequantize=dequantize, adapter=adapter), prompts, cached=cached)


def generate(llm: LLM, prompts, sampling_params: SamplingParams = SP, **kwargs) -> list[list[int]]:
    """The engine's token ids per prompt (token-id prompts, ``SP`` by default; ``kwargs`` go to
    ``LLM.generate``, e.g. ``lora_request``)."""
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sampling_params, use_tqdm=False, **kwargs)
    return [o.outputs[0].token_ids for o in outs]


def linears(llm: LLM) -> dict[str, LinearBase]:
    """The engine model's linear layers by module name."""
    return {n: m for n, m in llm.engine.runner.model.named_modules() if isinstance(m, LinearBase)}


def checkpoint_variant(src: str, dst: pathlib.Path, edit_config=None, edit_state=None) -> str:
    """A copy of the checkpoint ``src`` at ``dst``: ``edit_config`` edits its ``quantization_config``
    dict in place, ``edit_state`` its state dict (name -> tensor) in place."""
    shutil.copytree(src, dst)
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (dst / "config.json").write_text(json.dumps(cfg))
    if edit_state is not None:
        state = load_file(str(dst / "model.safetensors"))
        edit_state(state)
        save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return str(dst)
