"""Quantized checkpoints (issue 13, CPU path): compressed-tensors W8A16 / W4A16 (channel, group 32,
symmetric and asymmetric) and FP8 weights, made by the compressed-tensors library itself from a
tiny random Llama, give the same greedy tokens as Hugging Face's own loading (transformers'
compressed-tensors integration, dequantized on load, float32 CPU) — alone, batched and with
chunked prefill; online ``quantization="fp8"`` stores the same bytes and scales as the offline FP8
checkpoint; bad checkpoints fail at startup naming the tensor."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

pytest.importorskip("compressed_tensors")

from pageant.engine import LLM  # noqa: E402
from pageant.engine.config import EngineConfig  # noqa: E402
from pageant.engine.layers.quantization.compressed_tensors import unpack_int32  # noqa: E402
from tests.engine import quant_helpers  # noqa: E402
from tests.engine.quant_helpers import MAX_NEW, checkpoint_variant, generate, linears, random_prompts  # noqa: E402

SCHEMES = {
    "int8-channel": dict(num_bits=8, type="int", strategy="channel", symmetric=True),
    "int4-g32-sym": dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=True),
    "int4-g32-asym": dict(num_bits=4, type="int", strategy="group", group_size=32, symmetric=False),
    "fp8-channel": dict(num_bits=8, type="float", strategy="channel", symmetric=True),
    "fp8-tensor": dict(num_bits=8, type="float", strategy="tensor", symmetric=True),
}


def quantize_checkpoint(dense: str, out: pathlib.Path, weights: dict) -> str:
    """``dense`` quantized with compressed-tensors' own API (no llm-compressor): apply the config,
    set min/max scales with its ``calculate_qparams``, compress with its ``ModelCompressor``, save
    (float weights in float-quantized format, int weights pack-quantized) plus the tokenizer."""
    from pageant.engine.layers.quantization.checkpoints import compressed_tensors_checkpoint

    return compressed_tensors_checkpoint(dense, out, weights)


def hf_greedy(path: str, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' ``generate`` tokens, a quantized checkpoint dequantized on load."""
    quantized = "quantization_config" in json.loads((pathlib.Path(path) / "config.json").read_text())
    return quant_helpers.hf_greedy(path, prompts, dequantize=quantized)


@pytest.fixture(scope="module")
def dense(make_checkpoint) -> str:
    return make_checkpoint("llama")


@pytest.fixture(scope="module")
def quantized(dense, tmp_path_factory):
    built: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in built:
            built[name] = quantize_checkpoint(dense, tmp_path_factory.mktemp(name), SCHEMES[name])
        return built[name]

    return get


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return random_prompts(6, 0)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_matches_transformers(quantized, prompts, scheme):
    path = quantized(scheme)
    expected = hf_greedy(path, prompts)
    llm = LLM(model=path, max_num_seqs=8)
    layers = linears(llm)
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    if scheme.startswith("int"):
        assert qkv.weight_packed.dtype == torch.int32 and not hasattr(qkv, "weight")
        assert hasattr(qkv, "weight_zero_point") == scheme.endswith("asym")
    else:
        assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (qkv.out_features, 1)
    assert llm.engine.runner.model.lm_head.weight.dtype == torch.float32  # ignored: stays dense
    assert [generate(llm, [p])[0] for p in prompts[:2]] == expected[:2]  # alone
    assert generate(llm, prompts) == expected  # one batch
    # chunked prefill (a token budget below most prompts), small blocks, a few sequences at a time
    chunked = LLM(model=path, max_num_batched_tokens=8, block_size=4, max_num_seqs=3)
    assert generate(chunked, prompts) == expected


def test_dequantized_weights_equal_compressed_tensors(quantized):
    """The in-memory packed weights dequantize to compressed-tensors' own decompression."""
    from compressed_tensors.compressors import ModelCompressor
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    path = quantized("int4-g32-asym")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                               quantization_config=CompressedTensorsConfig(dequantize=True))
    assert ModelCompressor  # the reference above is compressed-tensors' decompression inside transformers
    layers = linears(LLM(model=path))
    ours = layers["model.layers.1.mlp.gate_up_proj"]
    w = ours.quant_method.dequantize(ours, torch.float32)
    mlp = ref.model.layers[1].mlp
    assert torch.equal(w, torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    qkv = layers["model.layers.0.self_attn.qkv_proj"]
    att = ref.model.layers[0].self_attn
    assert torch.equal(qkv.quant_method.dequantize(qkv, torch.float32),
                       torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]))


def test_int4_memory(dense, quantized):
    """int4 group-32 layers hold 4 bits per weight plus one scale and zero point per 32."""
    dense_layers = linears(LLM(model=dense))
    q_layers = linears(LLM(model=quantized("int4-g32-asym")))

    def nbytes(layer):
        return sum(p.numel() * p.element_size() for p in layer.parameters(recurse=False))

    total_dense = sum(nbytes(m) for m in dense_layers.values())
    total_q = sum(nbytes(m) for m in q_layers.values())
    weights = sum(m.weight.numel() for m in dense_layers.values())
    packed = sum(m.weight_packed.numel() * 4 for m in q_layers.values())
    assert packed == weights // 2  # 8 int4 values per int32
    assert total_dense == weights * 4  # float32
    # 0.5 B packed + 4/32 B float32 scale + 1/32 B int8 zero point per weight (+ weight_shape)
    assert total_q < 0.66 * weights
    assert total_q / (weights * 2) < 0.33  # against the same layers in bf16: under a third
    for m in q_layers.values():
        q = unpack_int32(m.weight_packed, 4, m.in_features)
        assert q.min() >= -8 and q.max() <= 7


def test_online_fp8_equals_offline(dense, quantized, prompts):
    online = LLM(model=dense, quantization="fp8")
    offline = LLM(model=quantized("fp8-channel"))
    a, b = linears(online), linears(offline)
    assert a.keys() == b.keys() and len(a) == 8  # qkv, o, gate_up, down per layer
    for name in a:
        assert a[name].weight.dtype == torch.float8_e4m3fn
        assert torch.equal(a[name].weight.view(torch.uint8), b[name].weight.view(torch.uint8)), name
        assert torch.equal(a[name].weight_scale, b[name].weight_scale), name
    model = online.engine.runner.model
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    assert generate(online, prompts) == generate(offline, prompts)
    fp8_bytes = sum(m.weight.numel() for m in a.values())
    assert sum(m.weight.numel() * m.weight.element_size() for m in a.values()) == fp8_bytes  # 1 byte a weight


def _variant(src: str, dst: pathlib.Path, edit_config=None, drop: str | None = None) -> str:
    """``checkpoint_variant`` without the tensor ``drop``."""
    return checkpoint_variant(src, dst, edit_config, None if drop is None else lambda state: state.pop(drop))


def test_bad_checkpoints(quantized, dense, tmp_path):
    int4 = quantized("int4-g32-sym")

    def bits8(q):
        q["config_groups"]["group_0"]["weights"]["num_bits"] = 8
    with pytest.raises(ValueError, match=r"down_proj.weight_packed.: packed weight is torch.int32 \(64, 16\), "
                                         r"expected int32 \(64, 32\)"):
        LLM(model=_variant(int4, tmp_path / "bits", bits8))

    def group16(q):
        q["config_groups"]["group_0"]["weights"]["group_size"] = 16
    with pytest.raises(ValueError, match=r"down_proj.weight_scale.*expected \(64, 8\)"):
        LLM(model=_variant(int4, tmp_path / "group", group16))

    with pytest.raises(ValueError, match=r"lacks weights.*layers.1.self_attn.qkv_proj.weight_scale:k"):
        LLM(model=_variant(int4, tmp_path / "noscale", drop="model.layers.1.self_attn.k_proj.weight_scale"))

    def unknown(q):
        q["quant_method"] = "bitsandbytes"
    with pytest.raises(ValueError, match=r"quant_method 'bitsandbytes'.*supported: compressed-tensors, fp8, gptq, awq"):
        LLM(model=_variant(int4, tmp_path / "bnb", unknown))

    def per_tensor_dynamic(q):  # batch-dependent scales: refused, the supported ones named
        q["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int", "dynamic": True}
    with pytest.raises(ValueError, match=r"group 'group_0': dynamic input activation strategy 'tensor' is not "
                                         r"supported; supported: token, group"):
        LLM(model=_variant(int4, tmp_path / "w8a8", per_tensor_dynamic))

    def outputs(q):
        q["config_groups"]["group_0"]["output_activations"] = {"num_bits": 8, "type": "float", "dynamic": True}
    with pytest.raises(ValueError, match=r"quantizes output activations, which is not supported"):
        LLM(model=_variant(int4, tmp_path / "out", outputs))

    with pytest.raises(ValueError, match=r"unsupported quantization 'marlin'; supported: compressed-tensors, fp8, gptq, awq"):
        EngineConfig(model=dense, quantization="marlin")
    with pytest.raises(ValueError, match=r"already quantized"):
        LLM(model=int4, quantization="fp8")
    with pytest.raises(ValueError, match=r"no quantization_config"):
        LLM(model=dense, quantization="compressed-tensors")


def test_bfloat16_model(dense, quantized, prompts):
    """In a bf16 model the scales take the model dtype; packed / FP8 storage keeps its own."""
    for path, kw in [(quantized("int4-g32-asym"), {}), (quantized("fp8-channel"), {})]:
        llm = LLM(model=path, dtype="bfloat16", **kw)
        down = linears(llm)["model.layers.0.mlp.down_proj"]
        assert down.weight_scale.dtype == torch.bfloat16
        assert (down.weight_packed if hasattr(down, "weight_packed") else down.weight).element_size() in (1, 4)
        assert all(len(t) == MAX_NEW for t in generate(llm, prompts[:2]))
    online = LLM(model=dense, dtype="bfloat16", quantization="fp8")
    offline = LLM(model=quantized("fp8-channel"), dtype="bfloat16")
    assert generate(online, prompts) == generate(offline, prompts)


def test_layer_bytes_exact():
    """A 1024 x 1024 W4A16 group-128 layer in a bf16 model: 4 bits a weight + a bf16 scale per 128."""
    from pageant.engine.layers.linear import RowParallelLinear
    from pageant.engine.layers.quantization.compressed_tensors import CompressedTensorsWNA16Method, WeightArgs

    with torch.device("meta"):
        layer = RowParallelLinear(1024, 1024, params_dtype=torch.bfloat16)
        layer.set_quant_method(CompressedTensorsWNA16Method(WeightArgs(4, "int", "group", True, 128, "pack-quantized")))
    layer = layer.to_empty(device="cpu")
    sizes = {n: p.numel() * p.element_size() for n, p in layer.named_parameters()}
    assert sizes == {"weight_packed": 1024 * 1024 // 2, "weight_scale": 1024 * 8 * 2, "weight_shape": 16}
    assert sum(sizes.values()) / (1024 * 1024 * 2) < 0.26  # vs the dense bf16 weight


def test_bad_checkpoints_name_the_tensor_or_setting(quantized, tmp_path):
    """Packed shapes that disagree with config.json, a missing zero point or static input scale,
    schemes outside what is supported (the message lists what is)."""
    asym = quantized("int4-g32-asym")
    wider = _variant(asym, tmp_path / "wider")
    cfg = json.loads((pathlib.Path(wider) / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (pathlib.Path(wider) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"weight 'model.layers.0.mlp.down_proj.weight_packed': packed weight is "
                                         r"torch.int32 \(64, 16\), expected int32 \(64, 32\) \(64 x 256 4-bit"):
        LLM(model=wider)

    with pytest.raises(ValueError, match=r"lacks weights.*layers.0.mlp.gate_up_proj.weight_zero_point:1"):
        LLM(model=_variant(asym, tmp_path / "nozero", drop="model.layers.0.mlp.up_proj.weight_zero_point"))

    def set_weights(**kw):
        def edit(q):
            q["config_groups"]["group_0"]["weights"].update(kw)
        return edit
    cases = {
        "bits2": (set_weights(num_bits=2), r"2-bit int weights are not supported; supported: 4, 8"),
        "tensor": (set_weights(strategy="tensor"), r"int weight strategy 'tensor' is not supported; supported: "
                                                   r"channel, group"),
        "fp4": (set_weights(type="float", num_bits=4), r"float weights of 4 bits .* supported: 8-bit \(FP8 E4M3\)"),
        "fp8-token": (lambda q: (set_weights(type="float", num_bits=8, strategy="token")(q),
                                 q.update(format="float-quantized"), q["config_groups"]["group_0"].pop("format")),
                      r"FP8 weight strategy 'token' is not supported; supported: tensor, channel, block"),
        "a4": (lambda q: q["config_groups"]["group_0"].update(input_activations={
            "num_bits": 4, "type": "int", "strategy": "token", "dynamic": True}),
            r"4-bit int input activations are not supported; supported: 8-bit int \(W8A8\) and 8-bit float"),
        "local": (lambda q: q["config_groups"]["group_0"].update(input_activations={
            "num_bits": 8, "type": "float", "strategy": "tensor_group", "dynamic": "local"}),
            r"input activations with dynamic='local' are not supported"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            LLM(model=_variant(asym, tmp_path / name, edit))


def test_missing_static_input_scale(make_checkpoint, tmp_path):
    from pageant.engine.layers.quantization.checkpoints import compressed_tensors_checkpoint

    path = compressed_tensors_checkpoint(make_checkpoint("llama"), tmp_path / "w8a8",
                                         dict(num_bits=8, type="int", strategy="channel", symmetric=True),
                                         dict(num_bits=8, type="int", strategy="tensor", dynamic=False),
                                         calibration=[[1, 4, 9, 16]])
    with pytest.raises(ValueError, match=r"lacks weights.*layers.1.self_attn.o_proj.input_scale"):
        LLM(model=_variant(path, tmp_path / "noinput", drop="model.layers.1.self_attn.o_proj.input_scale"))
