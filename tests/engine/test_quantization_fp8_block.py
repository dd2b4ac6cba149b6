"""``quant_method: fp8`` checkpoints (transformers' FineGrainedFP8: 128x128 block scales
``weight_scale_inv``, DeepSeek-V3 / Qwen3-FP8 style; and per-tensor ``weight_scale`` /
``input_scale``) and compressed-tensors' FP8 ``strategy: block`` (issue 13, CPU path).

The block checkpoint is made here from a tiny random Llama whose projections are whole 128-row
blocks (hidden 256, q 256 / k 128 / v 128 rows, MLP 384): scales ``amax / 448`` per block. On the CPU
transformers loads it itself (no FP8 kernels there: it dequantizes to a float model), so its greedy
tokens are the reference. transformers cannot load the per-tensor layout (it reads
``weight_scale_inv``, not ``weight_scale``), so that one is compared with its dequantized float twin
loaded by transformers."""

from __future__ import annotations

import pytest
import torch

from pageant.engine import LLM
from pageant.engine.layers.linear import ReplicatedLinear
from pageant.engine.layers.quantization.checkpoints import compressed_tensors_checkpoint, fp8_checkpoint
from pageant.engine.layers.quantization.fp8_block import BlockFp8Method
from tests.engine.quant_helpers import checkpoint_variant, generate, hf_greedy, linears, random_prompts

WIDE = dict(hidden_size=256, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def dense(make_checkpoint) -> str:
    return make_checkpoint("llama", **WIDE)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(5, 0)


@pytest.fixture(scope="module")
def block_ckpt(dense, tmp_path_factory) -> str:
    return fp8_checkpoint(dense, tmp_path_factory.mktemp("fp8") / "block", block=(128, 128))


def test_block_fp8_matches_transformers(block_ckpt, prompts):
    from transformers import AutoModelForCausalLM

    expected = hf_greedy(block_ckpt, prompts)
    llm = LLM(model=block_ckpt, max_num_seqs=8)
    layers = linears(llm)
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale_inv.shape == (4, 2)  # q 2, k 1, v 1 blocks
    assert layers["model.layers.0.mlp.down_proj"].weight_scale_inv.shape == (2, 3)
    hf = AutoModelForCausalLM.from_pretrained(block_ckpt, dtype=torch.float32)  # dequantized on load (CPU)
    att, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    ours = linears(llm)
    assert torch.equal(ours["model.layers.1.self_attn.qkv_proj"].quant_method.dequantize(
        ours["model.layers.1.self_attn.qkv_proj"], torch.float32),
        torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))
    gate_up = ours["model.layers.1.mlp.gate_up_proj"]
    assert torch.equal(gate_up.quant_method.dequantize(gate_up, torch.float32),
                       torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    assert generate(llm, prompts) == expected
    chunked = LLM(model=block_ckpt, max_num_batched_tokens=8, block_size=4, max_num_seqs=3)
    assert generate(chunked, prompts) == expected
    # 1 byte a weight + a scale per 128 x 128 block
    weights = sum(m.weight.numel() for m in layers.values())
    stored = sum(p.numel() * p.element_size() for m in layers.values() for p in m.parameters(recurse=False))
    assert stored - weights == 4 * sum(m.weight_scale_inv.numel() for m in layers.values()) < 0.001 * weights


def test_compressed_tensors_block_matches_transformers(dense, prompts, tmp_path):
    """compressed-tensors' FP8_BLOCK scheme: 128x128 weight blocks and dynamic FP8 activations per
    token and 128-wide group, fake-quantized as transformers does."""
    path = compressed_tensors_checkpoint(
        dense, tmp_path / "ct-block", dict(num_bits=8, type="float", strategy="block", block_structure=[128, 128],
                                           symmetric=True),
        dict(num_bits=8, type="float", strategy="group", group_size=128, dynamic=True, symmetric=True))
    expected = hf_greedy(path, prompts, cached=False)
    llm = LLM(model=path, max_num_seqs=8)
    qkv = linears(llm)["model.layers.0.self_attn.qkv_proj"]
    assert isinstance(qkv.quant_method, BlockFp8Method) and qkv.weight_scale.shape == (4, 2)
    assert qkv.quant_method.input_args.group_size == 128
    assert generate(llm, prompts) == expected


def test_per_tensor_fp8_matches_dequantized_reference(dense, prompts, tmp_path):
    """Per-tensor ``weight_scale`` with a static ``input_scale``: transformers cannot read this
    layout, so the reference is the dequantized float twin (weights only, as transformers' CPU
    path computes FP8 checkpoints)."""
    path = fp8_checkpoint(dense, tmp_path / "tensor", block=None, input_scale=0.05, reference=True)
    expected = hf_greedy(path + "-ref", prompts)
    llm = LLM(model=path, quantization="fp8")  # vLLM's flag names the checkpoint's method too
    down = linears(llm)["model.layers.0.mlp.down_proj"]
    assert down.weight.dtype == torch.float8_e4m3fn and down.weight_scale.unique().numel() == 1
    assert torch.all(down.input_scale == 0.05)
    assert generate(llm, prompts) == expected


def test_partial_blocks_equal_compressed_tensors_dequantization():
    """A 200 x 300 layer ends in partial blocks on both dims: the dequantized weight equals
    compressed-tensors' own block dequantization (which pads)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(200, 300, generator=g) * 100).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3, generator=g) + 0.01
    with torch.device("meta"):
        layer = ReplicatedLinear(300, 200)
        layer.set_quant_method(BlockFp8Method((128, 128), "weight_scale_inv"))
    layer = layer.to_empty(device="cpu")
    layer.weight_loader(layer.weight, weight)
    layer.weight_loader(layer.weight_scale_inv, scale)
    args = QuantizationArgs(num_bits=8, type="float", strategy="block", block_structure=[128, 128])
    expected = dequantize(weight, scale, args=args, dtype=torch.float32)
    assert torch.equal(layer.quant_method.dequantize(layer, torch.float32), expected)
    x = torch.randn(3, 300, generator=g)
    assert torch.equal(layer(x), torch.nn.functional.linear(x, expected))
    with pytest.raises(ValueError, match=r"block scale is float32 \(3, 3\), expected a float \(2, 3\) "
                                         r"\(200 x 300 weight in 128 x 128 blocks\)"):
        layer.weight_loader(layer.weight_scale_inv, torch.ones(3, 3))


def test_bad_fp8_checkpoints(block_ckpt, make_checkpoint, tmp_path):
    small = fp8_checkpoint(make_checkpoint("llama"), tmp_path / "small", block=(128, 128))
    with pytest.raises(ValueError, match=r"layers.0.self_attn.qkv_proj: part 'q' of 64 output rows \(64 on this rank\) "
                                         r"do not keep whole weight blocks of 128 rows"):
        LLM(model=small)

    def no_scale(s):
        del s["model.layers.1.self_attn.k_proj.weight_scale_inv"]
    with pytest.raises(ValueError, match=r"lacks weights.*layers.1.self_attn.qkv_proj.weight_scale_inv:k"):
        LLM(model=checkpoint_variant(block_ckpt, tmp_path / "noscale", edit_state=no_scale))

    def per_tensor_scale(s):
        s["model.layers.0.mlp.up_proj.weight_scale_inv"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"up_proj.weight_scale_inv.: block scale is float32 \(1,\), expected a float "
                                         r"\(3, 2\) \(384 x 256 weight in 128 x 128 blocks\)"):
        LLM(model=checkpoint_variant(block_ckpt, tmp_path / "shape", edit_state=per_tensor_scale))

    def block64(q):
        q["weight_block_size"] = [64, 64]
    with pytest.raises(ValueError, match=r"down_proj.weight_scale_inv.: block scale is float32 \(2, 3\), expected a "
                                         r"float \(4, 6\)"):
        LLM(model=checkpoint_variant(block_ckpt, tmp_path / "b64", edit_config=block64))

    def no_block(q):
        q["weight_block_size"] = None
    with pytest.raises(ValueError, match=r"unexpected weight 'model.layers.0.mlp.down_proj.weight_scale_inv'"):
        LLM(model=checkpoint_variant(block_ckpt, tmp_path / "noblock", edit_config=no_block))

    def static(q):
        q["activation_scheme"] = "static"
    with pytest.raises(ValueError, match=r"weight_block_size support activation_scheme 'dynamic' only"):
        LLM(model=checkpoint_variant(block_ckpt, tmp_path / "static", edit_config=static))

    def ue8m0(q):
        q["scale_fmt"] = "ue8m0"
    with pytest.raises(ValueError, match=r"scale_fmt 'ue8m0' .* not supported; supported: float"):
        LLM(model=checkpoint_variant(block_ckpt, tmp_path / "ue8m0", edit_config=ue8m0))
