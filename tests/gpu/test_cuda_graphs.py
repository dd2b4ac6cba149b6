"""CUDA-graph decode (engine/cuda_graph.py) on CUDA: replay equals the eager path for every batch size.

1. ``DecodeGraphs`` replay against the same padded forward run eagerly (``use_graphs=False``) and
   against the unpadded eager model, for every decode batch size 1..max_num_seqs (so every captured
   size, exactly and padded); the padding rows write nothing into the KV cache.
2. The engine with graphs against ``enforce_eager``: a batch that shrinks by one sequence per step
   walks through every captured size; float32 gives the same greedy tokens exactly, bfloat16 for at
   least ``BF16_FRACTION`` of the sequences (padding changes the GEMM shapes, hence the rounding).
3. LoRA: CUDA graphs are currently off when LoRA is on (``ModelRunner.uses_cuda_graphs``), so "with
   LoRA" tests what exists: no graphs are captured, and the eager LoRA engine on the device gives
   PEFT's merged-adapter greedy tokens (float32, same device) for a mixed base/adapter batch.
"""

from __future__ import annotations

import pathlib
import random

import pytest
import torch

from pageant.engine import LLM, LoRARequest, SamplingParams
from pageant.engine.attention import AttentionMetadata
from pageant.engine.config import ModelConfig
from pageant.engine.cuda_graph import DecodeGraphs, capture_sizes
from pageant.engine.loader import load_model
from pageant.kernels import triton_ops
from tests.gpu.conftest import REL_TOL, hf_greedy_on, rel_error

pytestmark = pytest.mark.gpu

MAX_NUM_SEQS = 32
BF16_FRACTION = 0.9
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _prompts(n: int, seed: int, longest: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, longest))] for _ in range(n)]


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@torch.inference_mode()
def test_replay_equals_eager_for_every_batch_size(dtype, requires_cuda, make_checkpoint):
    path = make_checkpoint("llama")
    mc = ModelConfig.from_pretrained(path)
    dev = torch.device("cuda")
    model = load_model(pathlib.Path(path), mc, triton_ops, dtype, dev, 512)
    block_size, width = 16, 8  # 128 tokens per sequence at most
    kv = torch.zeros(mc.num_layers, 2, MAX_NUM_SEQS * width + 1, block_size, mc.num_kv_heads, mc.head_dim,
                     dtype=dtype, device=dev)
    rng = random.Random(0)
    lens = [rng.randrange(1, 100) for _ in range(MAX_NUM_SEQS)]
    tables = torch.tensor([[i * width + j for j in range(width)] for i in range(MAX_NUM_SEQS)], dtype=torch.int32)
    slots = [i * width * block_size + p for i, n in enumerate(lens) for p in range(n)]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    prefill = AttentionMetadata(torch.tensor(slots, device=dev), cu.to(dev),
                                torch.tensor(lens, dtype=torch.int32, device=dev), tables.to(dev), 0, max(lens), max(lens))
    positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
    model(torch.randint(3, mc.vocab_size, (sum(lens),), device=dev), positions, kv, prefill)

    graphs = DecodeGraphs(model, kv, MAX_NUM_SEQS, width, 128)
    graphs.capture()
    assert sorted(graphs.graphs) == capture_sizes(MAX_NUM_SEQS)
    eager = DecodeGraphs(model, kv, MAX_NUM_SEQS, width, 128, use_graphs=False)
    for n in range(1, MAX_NUM_SEQS + 1):
        dec_slots = torch.tensor([i * width * block_size + lens[i] for i in range(n)], device=dev)
        md = AttentionMetadata(slot_mapping=dec_slots, query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=dev),
                               seq_lens=torch.tensor(lens[:n], dtype=torch.int32, device=dev) + 1,
                               block_tables=tables[:n].to(dev), num_decode_seqs=n, max_query_len=1,
                               max_seq_len=max(lens[:n]) + 1)
        ids = torch.randint(3, mc.vocab_size, (n,), device=dev)
        pos = torch.tensor(lens[:n], device=dev)
        before = kv.clone()
        replayed = graphs.run(ids, pos, md).clone()
        written = (kv != before).flatten(4).any(-1).any(0).any(0).flatten()  # [num_blocks * block_size]
        assert set(written.nonzero().flatten().tolist()) <= set(dec_slots.tolist()), f"batch {n}: padding wrote KV"
        padded = eager.run(ids, pos, md)
        assert replayed.shape == padded.shape and replayed.shape[0] >= n
        err = rel_error(replayed[:n], padded[:n])
        assert err <= REL_TOL[dtype] / 10, f"batch {n}: graph replay vs eager padded forward, relative error {err:.3g}"
        unpadded = model.compute_logits(model(ids, pos, kv, md))
        err = rel_error(replayed[:n], unpadded)
        assert err <= REL_TOL[dtype], f"batch {n}: graph replay vs unpadded eager, relative error {err:.3g}"
    del graphs, eager, model, kv
    _free("cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_with_graphs_equals_enforce_eager(dtype, requires_cuda, make_checkpoint):
    path = make_checkpoint("llama")
    prompts = [{"prompt_token_ids": p} for p in _prompts(MAX_NUM_SEQS, seed=1)]
    # one sequence finishes per step: the decode batch walks down through every size
    params = [SamplingParams(temperature=0, max_tokens=2 + i, ignore_eos=True) for i in range(MAX_NUM_SEQS)]
    tokens, used = {}, set()
    for enforce_eager in (True, False):
        llm = LLM(model=path, device="cuda", dtype=dtype, max_num_seqs=MAX_NUM_SEQS, num_kv_blocks=512,
                  max_model_len=256, enforce_eager=enforce_eager)
        graphs = llm.engine.runner.graphs
        assert (graphs is None) == enforce_eager
        if graphs is not None:
            run = graphs.run

            def recording(input_ids, positions, md, _run=run):
                out = _run(input_ids, positions, md)
                used.add(out.shape[0])
                return out

            graphs.run = recording
        tokens[enforce_eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        del llm, graphs
        _free("cuda")
    assert used == set(capture_sizes(MAX_NUM_SEQS)), f"replayed sizes {sorted(used)}"
    same = [a == b for a, b in zip(tokens[True], tokens[False])]
    if dtype == "float32":
        assert all(same), f"sequences that differ: {[i for i, s in enumerate(same) if not s]}"
    else:
        assert sum(same) / len(same) >= BF16_FRACTION, f"only {sum(same)}/{len(same)} sequences identical"


def test_lora_engine_runs_eagerly_and_matches_peft(device, make_checkpoint, make_adapter):
    base = make_checkpoint("llama")
    adapter = make_adapter(base, r=8, alpha=16, targets=ALL, seed=21)
    prompts = _prompts(8, seed=2, longest=40)
    expected = {None: hf_greedy_on(base, prompts, 10, torch.float32, device),
                "a": hf_greedy_on(base, prompts, 10, torch.float32, device, adapter)}
    assert expected["a"] != expected[None]
    llm = LLM(model=base, device=device, dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8,
              num_kv_blocks=256, max_num_seqs=16, max_model_len=128)
    assert llm.engine.runner.graphs is None  # today: CUDA graphs are off whenever LoRA is on
    order = [None, "a", "a", None, "a", None, None, "a"]
    loras = [None if name is None else LoRARequest("a", 1, adapter) for name in order]
    sp = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, lora_request=loras, use_tqdm=False)
    for i, (out, name) in enumerate(zip(outs, order)):
        assert out.outputs[0].token_ids == expected[name][i], f"prompt {i} with adapter {name}"
    del llm
    _free(device)
