"""Quantized checkpoints made from a float one, for tests and benchmarks (no network, no GPU).

- ``compressed_tensors_checkpoint``: compressed-tensors' own API (no llm-compressor): apply a
  ``QuantizationConfig``, set min/max weight scales with its ``calculate_qparams`` (per channel,
  group, tensor or block), static input scales from a calibration pass, compress with its
  ``ModelCompressor`` and save — the files llm-compressor would write for the same scales.
- ``fp8_checkpoint``: ``quant_method: fp8`` (transformers' FineGrainedFP8 layout): 128x128 block
  scales ``amax / 448`` as ``weight_scale_inv``, or per-tensor ``weight_scale`` (+ static
  ``input_scale``); ``reference`` also writes the dequantized float twin.
- ``gptq_checkpoint`` / ``awq_checkpoint``: round-to-nearest int4 with per-group float16 scales and
  zero points, packed as AutoGPTQ v1 / AutoAWQ GEMM store them (the tests pack their own
  independently; these feed the benchmark).

Every function copies the tokenizer and config of ``dense`` and returns the new folder's path.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Callable

import torch

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _copy_side_files(dense: str | pathlib.Path, out: pathlib.Path, qcfg: dict | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for f in pathlib.Path(dense).iterdir():
        if not f.name.endswith(".safetensors") and not (out / f.name).exists():
            shutil.copy(f, out / f.name)
    if qcfg is not None:
        cfg = json.loads((out / "config.json").read_text())
        cfg["quantization_config"] = qcfg
        (out / "config.json").write_text(json.dumps(cfg, indent=1))


def _input_ranges(model, calibration: list[list[int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear module: (min, max) of its inputs over the calibration prompts."""
    ranges: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rpartition(".")[2] in PROJ:
            def hook(mod, args, name=name):
                lo, hi = args[0].amin(), args[0].amax()
                old = ranges.get(name)
                ranges[name] = (lo, hi) if old is None else (torch.min(old[0], lo), torch.max(old[1], hi))
            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for ids in calibration:
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return ranges


def _weight_range(w: torch.Tensor, args) -> tuple[torch.Tensor, torch.Tensor]:
    if args.strategy == "group":
        grouped = w.unflatten(-1, (-1, args.group_size))  # [out, groups, group size]
        return grouped.amin(-1), grouped.amax(-1)
    if args.strategy == "channel":
        return w.amin(1, keepdim=True), w.amax(1, keepdim=True)
    if args.strategy == "block":
        bn, bk = args.block_structure
        n, k = w.shape
        padded = torch.nn.functional.pad(w, (0, -k % bk, 0, -n % bn))
        blocks = padded.unflatten(0, (-1, bn)).unflatten(-1, (-1, bk))  # [N / bn, bn, K / bk, bk]
        return blocks.amin((1, 3)), blocks.amax((1, 3))
    return w.amin(), w.amax()


def compressed_tensors_checkpoint(dense: str, out: str | pathlib.Path, weights: dict[str, Any],
                                  input_activations: dict[str, Any] | None = None,
                                  calibration: list[list[int]] | None = None) -> str:
    """``dense`` quantized by compressed-tensors with ``weights`` (and ``input_activations``)
    ``QuantizationArgs`` for every linear layer but ``lm_head``; static input scales come from the
    inputs' min/max over the ``calibration`` prompts (token id lists)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from compressed_tensors.quantization.utils import calculate_qparams
    from transformers import AutoModelForCausalLM

    out = pathlib.Path(out)
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    in_args = None if input_activations is None else QuantizationArgs(**input_activations)
    ranges = {}
    if in_args is not None and not in_args.dynamic:
        if not calibration:
            raise ValueError("static input activations need calibration prompts")
        ranges = _input_ranges(model, calibration)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=QuantizationArgs(**weights), input_activations=in_args)}, ignore=["lm_head"])
    apply_quantization_config(model, config, show_progress=False)
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is None:
            continue
        scale, zero = calculate_qparams(*_weight_range(module.weight.data, scheme.weights), scheme.weights)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        if name in ranges:
            scale, zero = calculate_qparams(*ranges[name], scheme.input_activations)
            module.input_scale.data.copy_(scale.reshape(module.input_scale.shape))
            if hasattr(module, "input_zero_point"):
                module.input_zero_point.data.copy_(zero.reshape(module.input_zero_point.shape))
    fmt = "float-quantized" if weights["type"] == "float" else None
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=fmt)
    compressor.compress_model(model)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    compressor.update_config(str(out))
    _copy_side_files(dense, out)
    return str(out)


def _fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.clamp(w / scale, -448.0, 448.0).to(torch.float8_e4m3fn)


def _linear_weights(dense: str):
    from safetensors.torch import load_file

    state = load_file(str(pathlib.Path(dense) / "model.safetensors"))
    for name, t in state.items():
        yield name, t, name.endswith(".weight") and name.rsplit(".", 2)[1] in PROJ


def _save(state: dict[str, torch.Tensor], dense: str, out: pathlib.Path, qcfg: dict | None) -> str:
    from safetensors.torch import save_file

    _copy_side_files(dense, out, qcfg)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def fp8_checkpoint(dense: str, out: str | pathlib.Path, block: tuple[int, int] | None = (128, 128),
                   input_scale: float | None = None, reference: bool = False) -> str:
    """``dense``'s linear weights in FP8: per ``block`` (``weight_scale_inv`` = block amax / 448,
    ``activation_scheme`` dynamic) or, ``block=None``, per tensor (``weight_scale``; a given
    ``input_scale`` makes it static). ``reference``: also ``<out>-ref``, the dequantized float
    checkpoint (what transformers' CPU dequantization holds)."""
    out = pathlib.Path(out)
    state, ref = {}, {}
    eps = torch.finfo(torch.float32).eps
    for name, t, quantize in _linear_weights(dense):
        if not quantize:
            state[name] = ref[name] = t
            continue
        w = t.float()
        if block is not None:
            bn, bk = block
            n, k = w.shape
            amax = torch.nn.functional.pad(w.abs(), (0, -k % bk, 0, -n % bn)).unflatten(0, (-1, bn)).unflatten(
                -1, (-1, bk)).amax((1, 3))  # [ceil(N / bn), ceil(K / bk)]
            scale = torch.clamp(amax / 448.0, min=eps)
            per_weight = scale.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
            state[name], state[name + "_scale_inv"] = _fp8(w, per_weight), scale
        else:
            scale = torch.clamp(w.abs().amax() / 448.0, min=eps)
            per_weight = scale
            state[name], state[name + "_scale"] = _fp8(w, scale), scale.reshape(())
            if input_scale is not None:
                state[name.removesuffix("weight") + "input_scale"] = torch.tensor(float(input_scale))
        ref[name] = state[name].float() * per_weight
    qcfg = {"quant_method": "fp8", "activation_scheme": "dynamic" if input_scale is None else "static",
            "weight_block_size": list(block) if block is not None else None}
    if reference:
        _save(ref, dense, out.with_name(out.name + "-ref"), None)
    return _save(state, dense, out, qcfg)


def _int4_groups(w: torch.Tensor, group_size: int, sym: bool):
    """Round-to-nearest int4 per group of input features: q [out, in] in [0, 15], zeros and
    float16 scales [out, groups]."""
    g = w.float().unflatten(-1, (-1, group_size))  # [out, groups, group size]
    if sym:
        scale = (g.abs().amax(-1) / 7.5).clamp(min=1e-8).half()
        zero = torch.full(scale.shape, 8, dtype=torch.int64)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8).half()
        zero = torch.clamp(torch.round(-lo / scale.float()), 0, 15).long()
    q = torch.clamp(torch.round(g / scale.float().unsqueeze(-1)) + zero.unsqueeze(-1), 0, 15).long()
    return q.flatten(-2), zero, scale


def _int4_checkpoint(dense: str, out: str | pathlib.Path, group_size: int, sym: bool, pack: Callable,
                     qcfg: dict) -> str:
    """``dense`` with every linear weight quantized by ``_int4_groups``; ``pack(q, zero, scale)``
    gives the module's tensors by name (``qweight``, ...); the other tensors are kept as they are."""
    state = {}
    for name, t, quantize in _linear_weights(dense):
        if not quantize:
            state[name] = t
            continue
        mod = name.removesuffix(".weight")
        for suffix, tensor in pack(*_int4_groups(t, group_size, sym)).items():
            state[f"{mod}.{suffix}"] = tensor
    return _save(state, dense, pathlib.Path(out), qcfg)


def gptq_checkpoint(dense: str, out: str | pathlib.Path, group_size: int = 128, sym: bool = True) -> str:
    """AutoGPTQ v1 int4 (``desc_act`` false): ``qweight`` packed along the input dim, ``qzeros``
    stored as ``zero - 1``, float16 ``scales``, ``g_idx``."""
    from pageant.engine.layers.quantization.gptq import pack_int32

    def pack(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qweight": pack_int32(q, 4).t().contiguous(),  # [in / 8, out]
                "qzeros": pack_int32(((zero - 1) & 15).t(), 4),  # [groups, out / 8]
                "scales": scale.t().contiguous(),
                "g_idx": (torch.arange(q.shape[1]) // group_size).to(torch.int32)}

    return _int4_checkpoint(dense, out, group_size, sym, pack, {
        "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": sym,
        "checkpoint_format": "gptq"})


def awq_checkpoint(dense: str, out: str | pathlib.Path, group_size: int = 128) -> str:
    """AutoAWQ GEMM int4 with zero points: ``qweight`` ``[in, out / 8]`` and ``qzeros`` packed along
    the output dim in AWQ's interleaved order, float16 ``scales`` ``[groups, out]``."""
    from pageant.engine.layers.quantization.awq import AWQ_ORDER
    from pageant.engine.layers.quantization.gptq import pack_int32

    def pack_awq(values: torch.Tensor) -> torch.Tensor:  # [rows, cols] -> [rows, cols / 8], nibble k: 8j + order[k]
        v = values.unflatten(-1, (-1, 8))[..., list(AWQ_ORDER)].flatten(-2)
        return pack_int32(v, 4)

    def pack(q: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qweight": pack_awq(q.t()), "qzeros": pack_awq(zero.t()), "scales": scale.t().contiguous()}

    return _int4_checkpoint(dense, out, group_size, False, pack, {
        "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"})
