"""The engine on the device against Hugging Face transformers on the same device (greedy tokens).

Small random checkpoints (``make_checkpoint``: weights spread so that logits are not near-uniform),
prompts of 2-70 tokens (8 in the CPU dry run), 16 new tokens each (no EOS stop). On CUDA the engine
runs the Triton kernels with CUDA graphs; Gemma 2 brings the sliding window and soft-capping,
Mixtral the fused MoE. transformers runs one prompt at a time (no padding).

- float32 (32 prompts, 4 families): the engine's tokens equal transformers' float32 tokens exactly.
- bfloat16 (64 prompts, llama and mixtral): both sides round differently (kernels, fusion, GEMM
  shapes), so a near tie can flip one token and everything after it (transformers' own bf16 tokens
  differ from its float32 tokens for 10-40% of such sequences). Two checks: at least ``BF16_FRACTION`` of the sequences equal
  transformers' bf16 tokens exactly ("most"), and against the float32 tokens the engine's bf16 run
  agrees on at least ``BF16_VS_HF`` times as many leading tokens as transformers' bf16 run does (a
  broken kernel agrees on almost none). Measured on the CPU (torch kernels, 64 prompts, 2 seeds,
  llama and mixtral): 64-81% identical, agreement ratios 0.94-1.08. The CPU dry run runs the code
  path and checks lengths only: the statistics need the device's own rounding and enough sequences.
"""

from __future__ import annotations

import random

import pytest
import torch

from pageant.engine import LLM, SamplingParams
from tests.gpu.conftest import hf_greedy_on

pytestmark = pytest.mark.gpu

ARCHS = ["llama", "qwen3", "gemma2", "mixtral"]
BF16_ARCHS = ["llama", "mixtral"]
MAX_NEW = 16
BF16_FRACTION = 0.5
BF16_VS_HF = 0.8


def _prompts(n: int, device: str, seed: int) -> list[list[int]]:
    """``n`` prompts of 2-70 tokens on CUDA, 8 in the CPU dry run."""
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 70))]
            for _ in range(n if device == "cuda" else 8)]


def _hf(path: str, prompts: list[list[int]], dtype: torch.dtype, device: str) -> list[list[int]]:
    return hf_greedy_on(path, prompts, MAX_NEW, dtype, device)


def _engine_greedy(path: str, prompts: list[list[int]], dtype: str, device: str) -> list[list[int]]:
    llm = LLM(model=path, device=device, dtype=dtype, max_num_seqs=len(prompts), num_kv_blocks=1024,
              max_model_len=256, block_size=16)
    if device == "cuda":
        assert llm.engine.runner.graphs is not None  # decode steps replay CUDA graphs
    sp = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp,
                                                          use_tqdm=False)]
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    del llm
    if device == "cuda":
        torch.cuda.empty_cache()
    return outs


def _agreement(ours: list[list[int]], theirs: list[list[int]]) -> list[int]:
    """Per sequence, how many leading tokens agree."""
    out = []
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        out.append(n)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_float32_matches_hf_float32_exactly(arch, device, make_checkpoint):
    path = make_checkpoint(arch)
    prompts = _prompts(32, device, seed=0)
    expected = _hf(path, prompts, torch.float32, device)
    got = _engine_greedy(path, prompts, "float32", device)
    assert got == expected, f"{arch}: leading tokens that agree per sequence: {_agreement(got, expected)}"


@pytest.mark.parametrize("arch", BF16_ARCHS)
def test_bfloat16_matches_hf_bfloat16_for_most_sequences(arch, device, make_checkpoint):
    path = make_checkpoint(arch)
    prompts = _prompts(64, device, seed=1)
    truth = _hf(path, prompts, torch.float32, device)
    expected = _hf(path, prompts, torch.bfloat16, device)
    got = _engine_greedy(path, prompts, "bfloat16", device)
    assert [len(t) for t in got] == [MAX_NEW] * len(prompts)
    agree = _agreement(got, expected)
    identical = sum(n == MAX_NEW for n in agree)
    ours, theirs = sum(_agreement(got, truth)), sum(_agreement(expected, truth))
    report = (f"{arch}: {identical}/{len(prompts)} sequences identical to HF bf16 (need {BF16_FRACTION:.0%}); "
              f"leading tokens that agree: {agree}; agreement with float32: engine {ours}, HF bf16 {theirs}")
    print(report)
    if device == "cpu":
        return  # the dry run: the code path only (see the module docstring)
    assert identical / len(prompts) >= BF16_FRACTION, report
    assert ours >= BF16_VS_HF * theirs, report
