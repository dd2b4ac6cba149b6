"""Tensor-parallel shards of quantized checkpoints (issue 13): every rank loads its part of the
packed weights, scales, zero points, act-order tables and block grids.

Fake ranks: the model is built with ``ParallelState(tp_rank=r, tp_size=2, group=object())`` (loading
uses no process group) and loaded from real checkpoints (compressed-tensors' own, GPTQ / AWQ packed
by the tests, FP8 blocks, online FP8). For every linear layer the ranks' dequantized weights
concatenate to the single-rank one — along the output rows of each merged part for
column-parallel layers, along the input features for row-parallel ones — and the ranks' partial
products of a row-parallel layer sum to the single-rank product. Splits through a group, a block
or a packed word are refused at startup."""

from __future__ import annotations

import importlib.util
import pathlib

import pytest
import torch

pytest.importorskip("compressed_tensors")

from pageant.engine.config import ModelConfig  # noqa: E402
from pageant.engine.layers.linear import (ColumnParallelLinear, LinearBase, MergedColumnParallelLinear,  # noqa: E402
                                          QKVParallelLinear, RowParallelLinear)
from pageant.engine.layers.parallel import ParallelState  # noqa: E402
from pageant.engine.layers.quantization.checkpoints import (awq_checkpoint, compressed_tensors_checkpoint,  # noqa: E402
                                                            fp8_checkpoint)
from pageant.engine.layers.quantization.sharding import parts, row_slices  # noqa: E402
from pageant.engine.loader import load_model  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
INT4_G32_ASYM = dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False)
CT = {
    "ct-int4-g32-asym": (INT4_G32_ASYM, None),
    "ct-int8-channel": (dict(num_bits=8, type="int", strategy="channel", symmetric=True), None),
    "ct-fp8-tensor": (dict(num_bits=8, type="float", strategy="tensor", symmetric=True), None),
    "ct-w8a8-static": (dict(num_bits=8, type="int", strategy="channel", symmetric=True),
                       dict(num_bits=8, type="int", strategy="tensor", dynamic=False, symmetric=True)),
}
# FP8 blocks need whole 128-row blocks per rank and part: head_dim 128, MLP 512
BLOCK_MODEL = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=2)


def _gptq_builder():
    spec = importlib.util.spec_from_file_location("gptq_awq_tests", HERE / "test_quantization_gptq_awq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build_pair


def load(path: str, tp_rank: int = 0, tp_size: int = 1, quantization: str | None = None):
    import pageant.kernels

    parallel = ParallelState(tp_rank=tp_rank, tp_size=tp_size, group=object() if tp_size > 1 else None)
    return load_model(pathlib.Path(path), ModelConfig.from_pretrained(path), pageant.kernels.get_ops("torch"),
                      torch.float32, torch.device("cpu"), 512, parallel, quantization=quantization)


@pytest.fixture(scope="module")
def checkpoint(make_checkpoint, tmp_path_factory):
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name in built:
            return built[name]
        root = tmp_path_factory.mktemp(name)
        dense = make_checkpoint("llama")
        if name in CT:
            path = compressed_tensors_checkpoint(dense, root / "q", *CT[name], calibration=[[1, 5, 9, 200, 33]])
        elif name.startswith("gptq"):
            path = _gptq_builder()(dense, root, "gptq", 4, 32, sym=False, desc_act=name.endswith("act-order"))[0]
        elif name == "awq-g32":
            path = awq_checkpoint(dense, root / "q", group_size=32)
        elif name == "fp8-block":
            path = fp8_checkpoint(make_checkpoint("llama", **BLOCK_MODEL), root / "q", block=(128, 128))
        else:
            path = dense
        built[name] = path
        return path

    return get


def _layers(model) -> dict[str, LinearBase]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearBase)}


def _weight(layer: LinearBase) -> torch.Tensor:
    method = layer.quant_method
    return method.dequantize(layer, torch.float32) if hasattr(method, "dequantize") else layer.weight


def check_shards(path: str, tp: int, quantization: str | None = None) -> None:
    full = _layers(load(path, quantization=quantization))
    ranks = [_layers(load(path, r, tp, quantization=quantization)) for r in range(tp)]
    x = torch.randn(3, 512, generator=torch.Generator().manual_seed(0))  # [num_tokens, widest input]
    for name, layer in full.items():
        w_full = _weight(layer)
        shards = [rank[name] for rank in ranks]
        assert type(shards[0].quant_method) is type(layer.quant_method), name
        if isinstance(layer, RowParallelLinear):
            assert torch.equal(torch.cat([_weight(s) for s in shards], dim=1), w_full), name
            k = layer.input_size
            xs = x[:, :k].chunk(tp, dim=1)
            with torch.no_grad():  # each rank's partial product; the all-reduce sums them
                total = sum(s.quant_method.apply(s, xi, None) for s, xi in zip(shards, xs))
                torch.testing.assert_close(total, layer.quant_method.apply(layer, x[:, :k], None), rtol=1e-5,
                                           atol=1e-5)
            continue
        assert isinstance(layer, ColumnParallelLinear), name
        for part in parts(layer):
            f_dst, _, f_size = row_slices(layer, part)
            pieces = []
            for s in shards:
                dst, _, size = row_slices(s, part)
                pieces.append(_weight(s)[dst:dst + size])
            if isinstance(layer, QKVParallelLinear) and part != "q" and shards[0].num_kv_head_replicas > 1:
                pieces = pieces[::shards[0].num_kv_head_replicas]  # replicated KV heads: one copy each
            assert torch.equal(torch.cat(pieces), w_full[f_dst:f_dst + f_size]), (name, part)


@pytest.mark.parametrize("name", [*CT, "gptq-g32", "gptq-g32-act-order", "awq-g32", "fp8-block"])
def test_ranks_concatenate_to_the_whole(checkpoint, name):
    check_shards(checkpoint(name), 2)


def test_online_fp8_shards(checkpoint):
    check_shards(checkpoint("dense"), 2, quantization="fp8")


def test_act_order_with_replicated_kv_heads(checkpoint):
    """tp 4 with 2 KV heads (each replicated on two ranks); act-order groups span every rank's
    input rows, so row-parallel ranks keep all scales and their slice of g_idx (vLLM's rule)."""
    path = checkpoint("gptq-g32-act-order")
    check_shards(path, 4)
    down = _layers(load(path, 1, 4))["model.layers.0.mlp.down_proj"]
    assert down.scales.shape == (64, 4) and down.g_idx.shape == (32,)  # 128 inputs / 32: all 4 groups
    plain = _layers(load(checkpoint("gptq-g32"), 1, 2))["model.layers.0.mlp.down_proj"]
    assert plain.scales.shape == (64, 2) and int(plain.g_idx.max()) == 1  # its own 2 groups, counted from 0


def test_shard_layout(checkpoint):
    """What each rank holds: packed words and group scales split along K; per-channel scales and
    static input scales whole."""
    ranks = [_layers(load(checkpoint("ct-int4-g32-asym"), r, 2)) for r in range(2)]
    down, gate_up = ranks[1]["model.layers.0.mlp.down_proj"], ranks[1]["model.layers.0.mlp.gate_up_proj"]
    assert down.weight_packed.shape == (64, 8) and down.weight_scale.shape == (64, 2)  # 64 of 128 inputs
    assert down.weight_zero_point.shape == (64, 2) and down.weight_shape.tolist() == [64, 64]
    assert gate_up.weight_packed.shape == (128, 8) and gate_up.weight_scale.shape == (128, 2)
    w8a8 = _layers(load(checkpoint("ct-w8a8-static"), 1, 2))["model.layers.1.self_attn.o_proj"]
    assert w8a8.weight.shape == (64, 32) and w8a8.weight_scale.shape == w8a8.input_scale.shape == (64, 1)
    block = _layers(load(checkpoint("fp8-block"), 1, 2))
    assert block["model.layers.0.self_attn.qkv_proj"].weight_scale_inv.shape == (3, 2)  # q, k, v: a block each
    assert block["model.layers.0.mlp.down_proj"].weight_scale_inv.shape == (2, 2)  # 256 of 512 inputs


def test_row_slices_agree_with_the_dense_loaders():
    """``row_slices`` (where block scales go) says what the layers' own loaders do with rows."""
    for tp in (1, 2, 4):
        for rank in range(tp):
            p = ParallelState(tp_rank=rank, tp_size=tp, group=object() if tp > 1 else None)
            layers = [QKVParallelLinear(16, 4, 4, 2, parallel=p), MergedColumnParallelLinear(16, [8, 16], parallel=p),
                      ColumnParallelLinear(16, 8, parallel=p), RowParallelLinear(16, 12, parallel=p)]
            for layer in layers:
                for part in parts(layer):
                    rows = {None: layer.output_size, "q": 16, "k": 8, "v": 8}.get(part, None)
                    rows = layer.output_sizes[part] if rows is None else rows
                    marker = torch.arange(rows, dtype=torch.float32).unsqueeze(1).expand(rows, layer.input_size)
                    layer.weight.data.fill_(-1)
                    layer.weight_loader(layer.weight, marker + 1000, part)
                    dst, src, size = row_slices(layer, part)
                    got = layer.weight[:, 0]
                    assert torch.equal(got[dst:dst + size], torch.arange(src, src + size) + 1000.0), (layer, part)


def test_splits_refused(checkpoint, make_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"o_proj: tensor parallel size 4 splits its 64 input features into 16 per rank, "
                                         r"which is not a multiple of group_size 32"):
        load(checkpoint("ct-int4-g32-asym"), 0, 4)
    with pytest.raises(ValueError, match=r"qkv_proj: part 'k' of 128 output rows split over 2 ranks \(64 on this "
                                         r"rank\) do not keep whole weight blocks of 128 rows"):
        wide = make_checkpoint("llama", hidden_size=256, intermediate_size=384, num_attention_heads=4,
                               num_key_value_heads=2)
        load(fp8_checkpoint(wide, tmp_path / "b", block=(128, 128)), 1, 2)
    with pytest.raises(ValueError, match=r"o_proj: tensor parallel size 2 splits its 256 input features into 128 "
                                         r"per rank, which is not a multiple of the weight block width 256"):
        load(fp8_checkpoint(make_checkpoint("llama", **BLOCK_MODEL), tmp_path / "b256", block=(128, 256)), 0, 2)
