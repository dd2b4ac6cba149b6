"""GPTQ (AutoGPTQ v1) and AWQ (GEMM) checkpoints, CPU dequant path (issue 13).

No GPTQ / AWQ library is available offline, so this file packs the checkpoints itself, following
AutoGPTQ's ``QuantLinear.pack`` and AutoAWQ's ``WQLinear_GEMM.from_linear`` loops (numpy, written
independently of the engine's unpacking): every linear weight of a tiny random Llama gets integer
weights, scales (float16) and zero points; the dequantized weights ``W_deq`` go into a dense float32
*reference* checkpoint. Pageant on the packed checkpoint must give the greedy tokens of transformers
(and of Pageant) on the reference, and its in-memory weights must dequantize to ``W_deq`` exactly.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pageant.engine import LLM
from pageant.engine.layers.quantization.awq import unpack_awq
from pageant.engine.layers.quantization.gptq import pack_int32, unpack_int32
from tests.engine.quant_helpers import MAX_NEW, checkpoint_variant, generate, hf_greedy, linears, random_prompts

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

SCHEMES = {
    "gptq-4bit-g32-sym": dict(fmt="gptq", bits=4, group_size=32, sym=True, desc_act=False),
    "gptq-4bit-g32-act-order": dict(fmt="gptq", bits=4, group_size=32, sym=False, desc_act=True),
    "gptq-8bit-channel": dict(fmt="gptq", bits=8, group_size=-1, sym=True, desc_act=False),
    "awq-4bit-g32": dict(fmt="awq", bits=4, group_size=32),
    "awq-4bit-g32-dense-down": dict(fmt="awq", bits=4, group_size=32, keep_dense=("down_proj",)),
}


# --- independent packing (the checkpoint writers' loops) -------------------------------------------

def pack_along_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's qweight packing: ``[n, cols]`` ints -> ``[n * bits / 32, cols]`` int32, row
    ``j * per + k`` at bits ``k * bits`` of packed row ``j``."""
    per = 32 // bits
    out = np.zeros((values.shape[0] // per, values.shape[1]), dtype=np.uint32)
    for j in range(out.shape[0]):
        for k in range(per):
            out[j] |= values[j * per + k].astype(np.uint32) << np.uint32(bits * k)
    return out.view(np.int32)


def pack_along_cols(values: np.ndarray, bits: int, order=None) -> np.ndarray:
    """AutoGPTQ's qzeros / AutoAWQ's packing: ``[rows, n]`` -> ``[rows, n * bits / 32]`` int32;
    slot ``k`` of word ``j`` holds column ``j * per + order[k]``."""
    per = 32 // bits
    order = order or list(range(per))
    out = np.zeros((values.shape[0], values.shape[1] // per), dtype=np.uint32)
    for j in range(out.shape[1]):
        for k in range(per):
            out[:, j] |= values[:, j * per + order[k]].astype(np.uint32) << np.uint32(bits * k)
    return out.view(np.int32)


def slow_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit by bit: element ``k`` of each word is ``sum_b bit(k * bits + b) << b``."""
    rows = []
    for row in packed.tolist():
        vals = []
        for word in row:
            u = word & 0xFFFFFFFF
            for k in range(32 // bits):
                vals.append(sum(((u >> (k * bits + b)) & 1) << b for b in range(bits)))
        rows.append(vals)
    return torch.tensor(rows, dtype=torch.uint8)


def quantize(w: torch.Tensor, bits: int, sym: bool, g_idx: np.ndarray):
    """``w`` [out, in] -> integer weights q [in, out], zeros z [groups, out], float16 scales s
    [groups, out] and the exact dequantized [out, in] float32 weight."""
    wt = w.t().numpy().astype(np.float64)  # [in, out]
    groups = int(g_idx.max()) + 1
    top = (1 << bits) - 1
    s = np.zeros((groups, wt.shape[1]))
    z = np.zeros((groups, wt.shape[1]), dtype=np.int64)
    for g in range(groups):
        rows = wt[g_idx == g]
        if sym:
            s[g] = np.abs(rows).max(0) / ((top - 1) / 2)
            z[g] = (top + 1) // 2
        else:
            lo, hi = np.minimum(rows.min(0), 0), np.maximum(rows.max(0), 0)
            s[g] = (hi - lo) / top
            z[g] = np.clip(np.round(-lo / s[g]), 0, top)
    s = s.astype(np.float16)
    if not sym:  # exercise the extremes, including zero point 0 (stored as -1 -> 15 in GPTQ v1)
        z[0, :4], z[-1, 4:8] = 0, top
    q = np.clip(np.round(wt / s[g_idx].astype(np.float64)) + z[g_idx], 0, top).astype(np.int64)
    q[0, :3] = [0, top, 1]  # extremes too
    deq = (q - z[g_idx]).astype(np.float32) * s[g_idx].astype(np.float32)
    return q, z, s, torch.from_numpy(deq.T.copy())


def build_pair(dense: str, root: pathlib.Path, fmt: str, bits: int, group_size: int, sym: bool = True,
               desc_act: bool = False, keep_dense=(), seed: int = 0) -> tuple[str, str, dict]:
    """(packed checkpoint, dense reference checkpoint, {checkpoint linear name: W_deq})."""
    rng = np.random.default_rng(seed)
    state = load_file(str(pathlib.Path(dense) / "model.safetensors"))
    packed, ref, deqs, perms = {}, {}, {}, {}
    for name, t in state.items():
        mod = name.removesuffix(".weight")
        if not (name.endswith(".weight") and mod.rpartition(".")[2] in PROJ) or \
                any(k in mod for k in keep_dense):
            packed[name] = ref[name] = t
            continue
        out, cols = t.shape
        gs = cols if group_size == -1 else group_size
        g_idx = np.arange(cols) // gs
        if desc_act:  # act-order: the groups follow a random permutation of the input rows, one per
            # input (GPTQ orders rows by the input's Hessian: q/k/v and gate/up share theirs)
            shared = mod.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            perm = perms.setdefault(shared, rng.permutation(cols))
            g_idx = np.empty(cols, dtype=np.int64)
            g_idx[perm] = np.arange(cols) // gs
        q, z, s, deq = quantize(t.float(), bits, sym, g_idx)
        deqs[mod], ref[name] = deq, deq
        if fmt == "gptq":
            packed[f"{mod}.qweight"] = torch.from_numpy(pack_along_rows(q, bits))
            packed[f"{mod}.qzeros"] = torch.from_numpy(pack_along_cols((z - 1) & ((1 << bits) - 1), bits))
            packed[f"{mod}.scales"] = torch.from_numpy(s)
            packed[f"{mod}.g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        else:
            packed[f"{mod}.qweight"] = torch.from_numpy(pack_along_cols(q, 4, AWQ_ORDER))
            packed[f"{mod}.qzeros"] = torch.from_numpy(pack_along_cols(z, 4, AWQ_ORDER))
            packed[f"{mod}.scales"] = torch.from_numpy(s)
    if fmt == "gptq":
        qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
                "checkpoint_format": "gptq", "damp_percent": 0.01, "true_sequential": True}
    else:
        qcfg = {"quant_method": "awq", "bits": bits, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": list(keep_dense) or None}
    paths = []
    for sub, tensors, q in (("packed", packed, qcfg), ("ref", ref, None)):
        d = root / sub
        d.mkdir(parents=True)
        for f in pathlib.Path(dense).iterdir():
            if f.name != "model.safetensors":
                shutil.copy(f, d / f.name)
        if q is not None:
            cfg = json.loads((d / "config.json").read_text())
            cfg["quantization_config"] = q
            (d / "config.json").write_text(json.dumps(cfg))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        paths.append(str(d))
    return paths[0], paths[1], deqs


@pytest.fixture(scope="module")
def dense(make_checkpoint) -> str:
    return make_checkpoint("llama")


@pytest.fixture(scope="module")
def pairs(dense, tmp_path_factory):
    built: dict[str, tuple] = {}

    def get(name: str):
        if name not in built:
            built[name] = build_pair(dense, tmp_path_factory.mktemp(name), **SCHEMES[name])
        return built[name]

    return get


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(5, 0)


# --- unpacking against the bit-by-bit reference ----------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
def test_unpack_matches_bit_by_bit(bits):
    g = torch.Generator().manual_seed(bits)
    packed = torch.randint(-(1 << 31), (1 << 31) - 1, (5, 7), dtype=torch.int32, generator=g)
    packed[0, 0], packed[0, 1], packed[0, 2] = -1, 0, -(1 << 31)
    ref = slow_unpack(packed, bits)
    assert torch.equal(unpack_int32(packed, bits), ref)
    assert torch.equal(pack_int32(ref, bits), packed)


def test_unpack_awq_matches_bit_by_bit():
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(-(1 << 31), (1 << 31) - 1, (4, 3), dtype=torch.int32, generator=g)
    natural = slow_unpack(packed, 4)  # [4, 24] nibble order
    expected = torch.empty_like(natural)
    for j in range(3):
        for k in range(8):
            expected[:, 8 * j + AWQ_ORDER[k]] = natural[:, 8 * j + k]
    assert torch.equal(unpack_awq(packed), expected)
    values = np.random.default_rng(0).integers(0, 16, (4, 24))  # and the test's own writer agrees
    assert torch.equal(unpack_awq(torch.from_numpy(pack_along_cols(values, 4, AWQ_ORDER))),
                       torch.from_numpy(values).to(torch.uint8))


# --- end to end ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_matches_dequantized_reference(pairs, prompts, scheme):
    packed, ref, deqs = pairs(scheme)
    llm = LLM(model=packed, max_num_seqs=8)
    layers = linears(llm)
    bits = SCHEMES[scheme]["bits"]
    for name, layer in layers.items():
        if "down_proj" in name and SCHEMES[scheme].get("keep_dense"):
            assert layer.weight.dtype == torch.float32 and not hasattr(layer, "qweight")
            continue
        assert layer.qweight.dtype == torch.int32 and not hasattr(layer, "weight")
        assert layer.qweight.numel() * 32 == layer.in_features * layer.out_features * bits  # still packed
        head = name.rpartition(".")[0]
        leaf = name.rpartition(".")[2]
        parts = {"qkv_proj": ["q_proj", "k_proj", "v_proj"],
                 "gate_up_proj": ["gate_proj", "up_proj"]}.get(leaf, [leaf])
        expected_w = torch.cat([deqs[f"{head}.{p}"] for p in parts])
        assert torch.equal(layer.quant_method.dequantize(layer, torch.float32), expected_w), name
    expected = hf_greedy(ref, prompts, cached=False)  # argmax steps: generate's min_new_tokens would ban EOS
    assert generate(LLM(model=ref), prompts) == expected
    assert generate(llm, prompts) == expected  # one batch
    assert [generate(llm, [p])[0] for p in prompts[:2]] == expected[:2]  # alone
    chunked = LLM(model=packed, max_num_batched_tokens=8, block_size=4, max_num_seqs=3)
    assert generate(chunked, prompts) == expected


def test_bfloat16_model(pairs, prompts):
    packed, _, _ = pairs("gptq-4bit-g32-act-order")
    llm = LLM(model=packed, dtype="bfloat16")
    down = linears(llm)["model.layers.0.mlp.down_proj"]
    assert down.scales.dtype == torch.bfloat16 and down.qweight.dtype == torch.int32
    assert all(len(t) == MAX_NEW for t in generate(llm, prompts[:2]))


# --- bad checkpoints -------------------------------------------------------------------------------

def test_bad_gptq(pairs, tmp_path):
    gptq, _, _ = pairs("gptq-4bit-g32-sym")

    def short_qweight(s):
        s["model.layers.0.mlp.down_proj.qweight"] = s["model.layers.0.mlp.down_proj.qweight"][:-1].contiguous()
    with pytest.raises(ValueError, match=r"layers.0.mlp.down_proj.qweight.: GPTQ qweight is int32 \(15, 64\), "
                                         r"expected int32 \(16, 64\)"):
        LLM(model=checkpoint_variant(gptq, tmp_path / "shape", edit_state=short_qweight))

    def as_8bit(q):
        q["bits"] = 8
    with pytest.raises(ValueError, match=r"down_proj.qweight.: GPTQ qweight is int32 \(16, 64\), "
                                         r"expected int32 \(32, 64\) \(128 input x 64 output 8-bit values"):
        LLM(model=checkpoint_variant(gptq, tmp_path / "bits8", as_8bit))

    def no_scales(s):
        del s["model.layers.1.self_attn.k_proj.scales"]
    with pytest.raises(ValueError, match=r"lacks weights.*layers.1.self_attn.qkv_proj.scales:k"):
        LLM(model=checkpoint_variant(gptq, tmp_path / "noscale", edit_state=no_scales))

    def bits3(q):
        q["bits"] = 3
    with pytest.raises(ValueError, match=r"GPTQ bits 3 is not supported; supported: 4, 8"):
        LLM(model=checkpoint_variant(gptq, tmp_path / "bits3", bits3))

    def v2(q):
        q["checkpoint_format"] = "gptq_v2"
    with pytest.raises(ValueError, match=r"GPTQ checkpoint_format 'gptq_v2' is not supported"):
        LLM(model=checkpoint_variant(gptq, tmp_path / "v2", v2))

    def no_bits(q):
        del q["bits"]
    with pytest.raises(ValueError, match=r"quant_method 'gptq' but no 'bits' setting"):
        LLM(model=checkpoint_variant(gptq, tmp_path / "nobits", no_bits))

    def g_idx_disagrees(s):
        g = s["model.layers.0.self_attn.v_proj.g_idx"]
        s["model.layers.0.self_attn.v_proj.g_idx"] = g.flip(0).contiguous()
    with pytest.raises(ValueError, match=r"v_proj.g_idx.: GPTQ g_idx of shard 'v' differs from that of shard '[kq]'"):
        LLM(model=checkpoint_variant(gptq, tmp_path / "gidx", edit_state=g_idx_disagrees))

    def g_idx_range(s):
        s["model.layers.0.mlp.up_proj.g_idx"] = torch.full((64,), 2, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"up_proj.g_idx.: GPTQ g_idx has groups outside \[0, 2\)"):
        LLM(model=checkpoint_variant(gptq, tmp_path / "gidx2", edit_state=g_idx_range))


def test_bad_awq(pairs, tmp_path):
    awq, _, _ = pairs("awq-4bit-g32")

    def gemv(q):
        q["version"] = "gemv"
    with pytest.raises(ValueError, match=r"AWQ version 'gemv' is not supported; supported: 'gemm'"):
        LLM(model=checkpoint_variant(awq, tmp_path / "gemv", gemv))

    def bits8(q):
        q["bits"] = 8
    with pytest.raises(ValueError, match=r"AWQ bits 8 is not supported; supported: 4"):
        LLM(model=checkpoint_variant(awq, tmp_path / "bits8", bits8))

    def transposed(s):
        s["model.layers.1.mlp.gate_proj.qweight"] = torch.zeros(16, 64, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"gate_proj.qweight.: AWQ qweight is int32 \(16, 64\), "
                                         r"expected int32 \(64, 16\)"):
        LLM(model=checkpoint_variant(awq, tmp_path / "shape", edit_state=transposed))

    def no_scales(s):
        del s["model.layers.0.mlp.down_proj.scales"]
    with pytest.raises(ValueError, match=r"lacks weights.*layers.0.mlp.down_proj.scales"):
        LLM(model=checkpoint_variant(awq, tmp_path / "noscale", edit_state=no_scales))

    def group64(q):
        q["group_size"] = 64
    with pytest.raises(ValueError, match=r"down_proj.qzeros.: AWQ qzeros is int32 \(4, 8\), expected int32 \(2, 8\)"):
        LLM(model=checkpoint_variant(awq, tmp_path / "group", group64))
