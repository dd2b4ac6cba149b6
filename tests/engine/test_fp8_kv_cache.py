"""The FP8 KV cache (``kv_cache_dtype="fp8"``) end to end on the CPU (float32 model unless said):
the pool holds 4x the fp32 (2x the bf16) blocks in the same memory, greedy outputs stay close to the
float cache (a measured agreement that a broken cache fails), per-layer k/v scales come from the
checkpoint (compressed-tensors', ModelOpt's and older names) and are used, prefix caching / chunked
prefill / preemption change nothing, the CUDA-graph padded decode and the Triton kernels (in the
interpreter) give the torch path's results, and ``vllm:cache_config_info`` reports ``cache_dtype``."""

from __future__ import annotations

import pathlib
import random
import shutil
import types

import pytest
import torch
from safetensors.torch import save_file

from pageant.engine import LLM, SamplingParams
from pageant.engine.config import EngineConfig
from pageant.engine.layers.attention import Attention
from pageant.kernels import reference

FP8 = torch.float8_e4m3fn
MAX_NEW = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=0)
# what the fp8 run must clear against the fp32 one (measured on the tiny llama: 0.66 and 0.020;
# a cache whose write and read scales disagree by 1.25x measures 0.11 and 0.14)
MIN_AGREEMENT, MAX_LOGPROB_DIFF = 0.45, 0.06


def mixed_prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 70))] for _ in range(n)]


def run(llm: LLM, prompts, sp=GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def agreement(base, other) -> tuple[float, float]:
    """(identical greedy tokens before each prompt's first divergence / all tokens, mean |logprob
    difference| of those tokens' chosen logprobs)."""
    same, total, diffs = 0, 0, []
    for a, b in zip(base, other):
        ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
        n = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))
        same, total = same + n, total + len(ta)
        diffs += [abs(a.outputs[0].logprobs[i][ta[i]].logprob - b.outputs[0].logprobs[i][tb[i]].logprob)
                  for i in range(n)]
    return same / total, sum(diffs) / max(len(diffs), 1)


def attention_layers(llm: LLM) -> list[Attention]:
    return [m for m in llm.engine.runner.model.modules() if isinstance(m, Attention)]


def test_config_values_and_flag():
    for dtype in ("float32", "bfloat16", "float16"):
        for kv in ("auto", "fp8", "fp8_e4m3"):
            assert EngineConfig(model="m", dtype=dtype, kv_cache_dtype=kv).kv_cache_dtype == kv
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, fp8, fp8_e4m3, got 'fp8_e5m2'"):
        EngineConfig(model="m", kv_cache_dtype="fp8_e5m2")
    from pageant.engine.server.cli_args import build_parser, engine_kwargs

    assert engine_kwargs(build_parser().parse_args(["--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] == "fp8"
    assert "kv_cache_dtype" not in engine_kwargs(build_parser().parse_args([]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--kv-cache-dtype", "int8"])


@pytest.mark.parametrize(("dtype", "ratio"), [("float32", 4), ("bfloat16", 2)])
def test_same_memory_holds_more_blocks(tiny_checkpoint, dtype, ratio):
    gib, block_size = 0.002, 16
    float_llm = LLM(model=tiny_checkpoint, dtype=dtype, kv_cache_memory_gib=gib, block_size=block_size)
    fp8_llm = LLM(model=tiny_checkpoint, dtype=dtype, kv_cache_memory_gib=gib, block_size=block_size,
                  kv_cache_dtype="fp8")
    mc = float_llm.engine.model_config
    elem = 4 if dtype == "float32" else 2
    per_block = mc.num_layers * 2 * block_size * mc.num_kv_heads * mc.head_dim  # elements of one block
    budget = int(gib * 2**30)
    assert float_llm.engine.runner.bytes_per_block() == per_block * elem
    assert fp8_llm.engine.runner.bytes_per_block() == per_block
    want_float, want_fp8 = budget // (per_block * elem), budget // per_block  # 262 / 1048 (fp32), 524 / 1048 (bf16)
    assert want_fp8 < 64 * -(-512 // block_size)  # below the max_num_seqs x max_model_len cap
    assert float_llm.stats()["num_kv_blocks"] == want_float
    assert fp8_llm.stats()["num_kv_blocks"] == want_fp8 == ratio * want_float
    pool = fp8_llm.engine.runner.kv_cache
    assert pool.dtype == FP8 and pool.shape[2] == want_fp8 and fp8_llm.engine.block_manager.num_blocks == want_fp8
    assert fp8_llm.engine.config.num_kv_blocks == want_fp8
    assert pool.numel() * pool.element_size() <= budget
    assert float_llm.engine.runner.kv_cache.dtype == getattr(torch, dtype)


@pytest.fixture(scope="module")
def float_run(tiny_checkpoint):
    prompts = mixed_prompts(32)
    return prompts, run(LLM(model=tiny_checkpoint, num_kv_blocks=300), prompts)


def test_greedy_agreement_with_the_float_cache(tiny_checkpoint, float_run):
    prompts, base = float_run
    fp8_llm = LLM(model=tiny_checkpoint, num_kv_blocks=300, kv_cache_dtype="fp8")
    agree, dlogprob = agreement(base, run(fp8_llm, prompts))
    print(f"\nfp8 KV vs fp32 KV, 32 prompts x {MAX_NEW} greedy tokens: {agree:.3f} of tokens identical before the "
          f"first divergence, mean |logprob difference| of the chosen tokens {dlogprob:.4f}")
    assert agree >= MIN_AGREEMENT and dlogprob <= MAX_LOGPROB_DIFF

    # the same thresholds catch a broken cache: the write quantizes with 1.25x the scale the read uses
    broken = LLM(model=tiny_checkpoint, num_kv_blocks=300, kv_cache_dtype="fp8")
    ops = types.SimpleNamespace(**{n: getattr(reference, n) for n in dir(reference) if not n.startswith("__")})

    def skewed_write(k, v, k_cache, v_cache, slots, *, k_scale, v_scale):
        reference.reshape_and_cache(k, v, k_cache, v_cache, slots, k_scale=k_scale * 1.25, v_scale=v_scale * 1.25)

    ops.reshape_and_cache = skewed_write
    for attn in attention_layers(broken):
        attn.ops = ops
    bad_agree, bad_dlogprob = agreement(base, run(broken, prompts))
    print(f"broken cache (write scale 1.25x the read's): {bad_agree:.3f}, {bad_dlogprob:.4f}")
    assert bad_agree < MIN_AGREEMENT and bad_dlogprob > MAX_LOGPROB_DIFF


def _scaled_checkpoint(src: str, dst: pathlib.Path, tensors: dict[str, torch.Tensor]) -> str:
    """A copy of checkpoint ``src`` plus one more safetensors file holding ``tensors``."""
    shutil.copytree(src, dst)
    save_file(tensors, str(dst / "kv_scales.safetensors"))
    return str(dst)


def _compressed_tensors_scales(num_layers: int, num_kv_heads: int, head_dim: int, values) -> dict[str, torch.Tensor]:
    """k/v scales named, shaped and typed as compressed-tensors' kv_cache_scheme (float8, per tensor)
    registers them on each attention module (``initialize_qparams(attn, "k" | "v", ...)``)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.initialize import initialize_qparams

    args = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    out = {}
    for layer, (k, v) in zip(range(num_layers), values):
        attn = torch.nn.Module()
        for base, value in (("k", k), ("v", v)):
            initialize_qparams(attn, base, args, observed_shape=(num_kv_heads, None, head_dim),
                               observed_dtype=torch.float32, force_zero_point=False)
            getattr(attn, f"{base}_scale").data.fill_(value)
        out |= {f"model.layers.{layer}.self_attn.{name}": t.detach().clone() for name, t in attn.state_dict().items()}
    return out


def test_checkpoint_scales_are_loaded_and_used(tiny_checkpoint, tmp_path):
    values = [(0.02, 0.05), (0.03, 0.04)]  # (k_scale, v_scale) per layer; K/V here reach about 3.6
    tensors = _compressed_tensors_scales(2, 2, 16, values)
    assert sorted(tensors) == [f"model.layers.{i}.self_attn.{s}" for i in (0, 1) for s in ("k_scale", "v_scale")]
    assert all(t.shape == (1,) for t in tensors.values())
    path = _scaled_checkpoint(tiny_checkpoint, tmp_path / "ct", tensors)
    prompt = mixed_prompts(1, seed=3)[0] + [7] * 40
    one = SamplingParams(temperature=0, max_tokens=1)  # the prompt's prefill only writes the cache
    base = LLM(model=tiny_checkpoint, num_kv_blocks=16, block_size=8)
    scaled = LLM(model=path, num_kv_blocks=16, block_size=8, kv_cache_dtype="fp8")
    layers = attention_layers(scaled)
    assert [(a.k_scale.item(), a.v_scale.item()) for a in layers] == [tuple(torch.tensor(v).tolist()) for v in values]
    assert all(a.k_scale.dtype == torch.float32 for a in layers)
    run(base, [prompt], one), run(scaled, [prompt], one)
    float_pool, fp8_pool = base.engine.runner.kv_cache, scaled.engine.runner.kv_cache
    for layer, (k_scale, v_scale) in enumerate(values):
        for kv, s in ((0, k_scale), (1, v_scale)):
            ref, got = float_pool[layer, kv], fp8_pool[layer, kv]
            written = ref != 0
            assert written.sum() == len(prompt) * 2 * 16  # every prompt token, both kv heads
            if layer == 0:  # the first layer's K/V do not depend on the cache: bytes are exact
                assert torch.equal(got[written].view(torch.uint8),
                                   reference.quantize_fp8(ref[written], torch.tensor(s)).view(torch.uint8))
            deq = got[written].float() * s
            err = (deq - ref[written]).abs()
            assert err.max() <= 0.07 * ref[written].abs().max()  # e4m3's 3-bit mantissa, scaled
            assert (got[written].float() - ref[written]).abs().max() > 10  # with the scale ignored: far off
            assert (got[~written].view(torch.uint8) == 0).all()
    # and the model still greedily agrees with the float cache as well as with scale 1.0
    prompts = mixed_prompts(8, seed=5)
    agree, _ = agreement(run(base, prompts), run(scaled, prompts))
    assert agree >= MIN_AGREEMENT


def test_other_scale_names_and_errors(tiny_checkpoint, tmp_path):
    """ModelOpt's ``k_proj.k_scale``, older compressed-tensors' ``k_proj.output_scale``, the deprecated
    single ``kv_scale`` (both k and v), 0-dim tensors in bf16; q/prob scales are read and ignored;
    without scales fp8 uses 1.0; per-head scales and non-positive values are clear errors."""
    t = lambda x, dtype=torch.bfloat16: torch.tensor(x, dtype=dtype)  # noqa: E731
    path = _scaled_checkpoint(tiny_checkpoint, tmp_path / "old", {
        "model.layers.0.self_attn.k_proj.k_scale": t([0.25]), "model.layers.0.self_attn.v_proj.v_scale": t(0.5),
        "model.layers.1.self_attn.kv_scale": t([2.0]), "model.layers.1.self_attn.q_proj.output_scale": t([3.0]),
        "model.layers.0.self_attn.q_scale": t([3.0]), "model.layers.0.self_attn.prob_output_scale": t([3.0]),
    })
    scales = [(a.k_scale.item(), a.v_scale.item()) for a in attention_layers(LLM(model=path, kv_cache_dtype="fp8"))]
    assert scales == [(0.25, 0.5), (2.0, 2.0)]
    path = _scaled_checkpoint(tiny_checkpoint, tmp_path / "output_scale", {
        "model.layers.1.self_attn.k_proj.output_scale": t([0.125], torch.float32),
        "model.layers.1.self_attn.v_proj.output_scale": t([4.0], torch.float32)})
    scales = [(a.k_scale.item(), a.v_scale.item()) for a in attention_layers(LLM(model=path, kv_cache_dtype="fp8"))]
    assert scales == [(1.0, 1.0), (0.125, 4.0)]
    assert all(a.k_scale.item() == a.v_scale.item() == 1.0
               for a in attention_layers(LLM(model=tiny_checkpoint, kv_cache_dtype="fp8")))
    for i, (name, tensor, match) in enumerate((
        ("model.layers.0.self_attn.k_scale", torch.ones(2, 1, 1),
         r"k_scale must hold one per-tensor value, got shape \(2, 1, 1\)"),
        ("model.layers.0.self_attn.v_scale", t([0.0], torch.float32), "v_scale must be a positive finite number"),
        ("model.layers.9.self_attn.k_scale", t([1.0], torch.float32), "no attention layer at 'model.layers.9.self_attn'"),
    )):
        bad = _scaled_checkpoint(tiny_checkpoint, tmp_path / f"bad{i}", {name: tensor})
        with pytest.raises(ValueError, match=match):
            LLM(model=bad, kv_cache_dtype="fp8")


def test_prefix_caching_chunked_prefill_and_preemption_change_nothing(tiny_checkpoint):
    rng = random.Random(1)
    prefixes = [[1] + [rng.randrange(3, 500) for _ in range(k - 1)] for k in (20, 37, 50)]
    prompts = [prefixes[i % 3] + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 21))] for i in range(14)]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    common = dict(model=tiny_checkpoint, kv_cache_dtype="fp8", block_size=8)
    plain = tokens(run(LLM(**common), prompts, sp))
    cached = LLM(**common, enable_prefix_caching=True)
    assert tokens(run(cached, prompts, sp)) == plain
    assert tokens(run(cached, prompts, sp)) == plain  # every prompt's leading blocks from the cache now
    assert cached.stats()["prefix_cache_hits"] > 0
    assert tokens(run(LLM(**common, max_num_batched_tokens=16, max_num_seqs=8), prompts, sp)) == plain
    small = LLM(**common, num_kv_blocks=12, max_num_seqs=16)
    assert tokens(run(small, prompts, sp)) == plain
    assert small.stats()["num_preemptions"] > 0
    everything = LLM(**common, num_kv_blocks=14, max_num_seqs=16, max_num_batched_tokens=24, enable_prefix_caching=True)
    assert tokens(run(everything, prompts, sp)) == plain
    stats = everything.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]


def test_bf16_model_with_fp8_cache(tiny_checkpoint):
    """The scales stay float32 (the loader casts float buffers to the model dtype first)."""
    bf16 = LLM(model=tiny_checkpoint, dtype="bfloat16", num_kv_blocks=64)
    fp8 = LLM(model=tiny_checkpoint, dtype="bfloat16", num_kv_blocks=64, kv_cache_dtype="fp8_e4m3")
    assert all(a.k_scale.dtype == a.v_scale.dtype == torch.float32 for a in attention_layers(fp8))
    prompts = mixed_prompts(8, seed=2)
    agree, dlogprob = agreement(run(bf16, prompts), run(fp8, prompts))
    assert agree >= MIN_AGREEMENT and dlogprob <= 2 * MAX_LOGPROB_DIFF  # bf16 itself adds noise on both sides


TRITON_SCRIPT = r"""
import json, pathlib, sys, torch
torch.set_num_threads(1)
from pageant.engine import LLM, SamplingParams
from pageant.engine.attention import AttentionMetadata
from pageant.engine.config import ModelConfig
from pageant.engine.cuda_graph import DecodeGraphs
from pageant.engine.loader import load_model
from pageant.kernels import triton_ops
path = sys.argv[1]
result = {}
# chunked prefill mixing decodes with prefill chunks, on the Triton kernels and on torch
prompts = [{"prompt_token_ids": [1] + [(7 * i) % 400 + 3 for i in range(k)]} for k in (3, 30)]
sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
for backend in ("triton", "torch"):
    llm = LLM(model=path, attention_backend=backend, kv_cache_dtype="fp8", block_size=8, max_num_batched_tokens=12)
    result[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
# the CUDA-graph decode path (run eagerly here, padded to a capture size) over an FP8 pool
mc = ModelConfig.from_pretrained(path)
model = load_model(pathlib.Path(path), mc, triton_ops, torch.float32, torch.device("cpu"), 256)
kv = torch.zeros(mc.num_layers, 2, 12, 4, mc.num_kv_heads, mc.head_dim, dtype=torch.float8_e4m3fn)
lens, width = [5, 9, 3], 4  # sequence i owns blocks 4i .. 4i + 3
tables = torch.tensor([[4 * i + j for j in range(width)] for i in range(3)], dtype=torch.int32)
slots = torch.tensor([16 * i + p for i, n in enumerate(lens) for p in range(n)])
md = AttentionMetadata(slots, torch.tensor([0, 5, 14, 17], dtype=torch.int32), torch.tensor(lens, dtype=torch.int32),
                       tables, 0, 9, 9)
with torch.inference_mode():
    model(torch.arange(3, 20), torch.cat([torch.arange(n) for n in lens]), kv, md)
    dec = AttentionMetadata(torch.tensor([16 * i + n for i, n in enumerate(lens)]), torch.arange(4, dtype=torch.int32),
                            torch.tensor(lens, dtype=torch.int32) + 1, tables, 3, 1, 10)
    ids, pos = torch.tensor([11, 12, 13]), torch.tensor(lens)
    kv_eager = kv.clone()
    want = model.compute_logits(model(ids, pos, kv_eager, dec))
    graphs = DecodeGraphs(model, kv, max_num_seqs=4, max_blocks_per_seq=width, max_model_len=16, use_graphs=False)
    got = graphs.run(ids, pos, dec)
result["graph_rows"] = got.shape[0]
result["graph_max_diff"] = (got[:3] - want).abs().max().item()
result["graph_pool_equal"] = torch.equal(kv.view(torch.uint8), kv_eager.view(torch.uint8))
print(json.dumps(result))
"""


def test_triton_kernels_and_padded_graph_decode(tiny_checkpoint, tmp_path, run_interpreted):
    """With the checkpoint's scales: the Triton backend (interpreter) gives the torch backend's tokens
    through mixed decode + chunked-prefill steps, and the padded CUDA-graph decode (run eagerly)
    equals the unpadded step with its padding rows writing nothing to the FP8 pool."""
    scales = _compressed_tensors_scales(2, 2, 16, [(0.02, 0.05), (0.03, 0.04)])
    path = _scaled_checkpoint(tiny_checkpoint, tmp_path / "ct", scales)
    result = run_interpreted(TRITON_SCRIPT, path)
    assert result["triton"] == result["torch"] and all(len(t) == 4 for t in result["torch"])
    assert result["graph_rows"] == 4 and result["graph_max_diff"] < 1e-4 and result["graph_pool_equal"]


def test_cache_config_info_reports_cache_dtype(tiny_checkpoint):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from pageant.engine import LLMEngine
    from pageant.engine.server.app import ServerConfig, build_app

    for kv_cache_dtype in ("fp8", "auto"):
        engine = LLMEngine.from_kwargs(model=tiny_checkpoint, num_kv_blocks=32, kv_cache_dtype=kv_cache_dtype)
        with TestClient(build_app(engine, ServerConfig(log_requests=False))) as client:
            text = client.get("/metrics").text
        [sample] = [s for f in text_string_to_metric_families(text) for s in f.samples
                    if s.name == "vllm:cache_config_info"]
        assert sample.labels["cache_dtype"] == kv_cache_dtype and sample.labels["num_gpu_blocks"] == "32"
        assert sample.value == 1
