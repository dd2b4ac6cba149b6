"""Quantized linear layers: which checkpoint formats load, and how a model gets its quant methods.

``resolve_quantization(hf_config, requested)`` reads config.json's ``quantization_config`` and the
user's ``EngineConfig.quantization`` (vLLM's names) and returns a ``QuantConfig`` or None (dense):

- ``"compressed-tensors"`` (detected from ``quant_method``; see ``compressed_tensors.py``):
  ``pack-quantized`` int4/int8 weights (W4A16, W8A16: channel or group scales, symmetric or with
  zero points), ``int-quantized`` int8 weights (W8A8), ``float-quantized`` / ``naive-quantized``
  FP8 weights per tensor, per channel or per block (``strategy: block``); with or without
  ``input_activations`` (dynamic per-token int8 / FP8, dynamic per-group FP8, static per-tensor
  ``input_scale``), fake-quantized as Hugging Face does (``activations.py``); ``ignore`` lists;
- ``"fp8"`` checkpoints (detected, ``quant_method: fp8``; see ``fp8_checkpoint.py``): block-wise
  ``weight_scale_inv`` (``weight_block_size`` [128, 128], DeepSeek-V3 / Qwen3-FP8) or per-tensor
  ``weight_scale`` / ``input_scale``;
- ``"gptq"`` (detected): AutoGPTQ v1 int4 / int8, group or per channel, act-order ``g_idx``; see
  ``gptq.py``;
- ``"awq"`` (detected): AutoAWQ GEMM int4 with zero points; see ``awq.py``;
- ``quantization="fp8"`` on a float checkpoint: online FP8, every linear layer (embeddings and
  lm_head stay dense), one scale per output channel; see ``fp8.py``.

``apply_quantization(model, quant_config)`` swaps the quant method of every ``LinearBase`` the
config covers, on the meta-device model before it is allocated. Tensor parallelism: each rank
loads its shard of the packed tensors, scales, zero points and block grids (``sharding.py``); a
split through a packed word, a group or a block is refused at startup. LoRA adapters apply on top
of quantized layers as on dense ones. The CPU path dequantizes per layer on the fly in ``apply``.
Bad checkpoints (packed shapes that disagree with config.json, a missing scale or zero point, an
unknown ``quant_method``, an unsupported scheme) fail at startup naming the tensor or setting.
"""

from __future__ import annotations

from typing import Any

from torch import nn

SUPPORTED_QUANTIZATION = ("compressed-tensors", "fp8", "gptq", "awq")  # what EngineConfig.quantization may request
LOADABLE_QUANTIZATION = SUPPORTED_QUANTIZATION  # checkpoint formats (fp8 also online, of a float checkpoint)


class QuantConfig:
    """A model-wide quantization setting: the quant method of each linear layer."""

    name: str = ""
    online = False  # quantizes a float checkpoint as it loads (any family); else a quantized checkpoint

    def get_quant_method(self, layer: nn.Module, prefix: str, checkpoint_names: list[str]):
        """The method for the ``LinearBase`` ``layer`` called ``prefix`` in our model, whose checkpoint
        modules are ``checkpoint_names`` (several for merged q/k/v, gate/up); None: stays dense."""
        raise NotImplementedError


def resolve_quantization(hf_config: dict[str, Any], requested: str | None) -> QuantConfig | None:
    """The quantization of a checkpoint (``requested`` None: detect from config.json)."""
    qcfg = hf_config.get("quantization_config")
    method = None if qcfg is None else str(qcfg.get("quant_method", "")).lower().replace("_", "-")
    if requested is not None and requested not in SUPPORTED_QUANTIZATION:
        raise ValueError(f"unsupported quantization {requested!r}; supported: {', '.join(SUPPORTED_QUANTIZATION)}")
    if qcfg is not None and method not in ("compressed-tensors", "gptq", "awq", "fp8"):
        raise ValueError(f"checkpoint quantization_config has quant_method {qcfg.get('quant_method')!r}, which is "
                         f"not supported; supported: {', '.join(LOADABLE_QUANTIZATION)}")
    if requested == "fp8" and method != "fp8":
        if qcfg is not None:
            raise ValueError("quantization='fp8' quantizes a float checkpoint online, but this checkpoint is already "
                             f"quantized ({method}); leave quantization unset to load it as it is")
        from pageant.engine.layers.quantization.fp8 import Fp8OnlineConfig

        return Fp8OnlineConfig()
    if requested is not None and qcfg is None:
        raise ValueError(f"quantization={requested!r} but the checkpoint's config.json has no quantization_config")
    if qcfg is None:
        return None
    if requested is not None and method != requested:
        raise ValueError(f"quantization={requested!r} but the checkpoint is quantized with {method}")
    if method == "gptq":
        from pageant.engine.layers.quantization.gptq import GptqConfig

        return GptqConfig.from_config(qcfg)
    if method == "awq":
        from pageant.engine.layers.quantization.awq import AwqConfig

        return AwqConfig.from_config(qcfg)
    if method == "fp8":
        from pageant.engine.layers.quantization.fp8_checkpoint import Fp8CheckpointConfig

        return Fp8CheckpointConfig.from_config(qcfg)
    from pageant.engine.layers.quantization.compressed_tensors import CompressedTensorsConfig

    return CompressedTensorsConfig.from_config(qcfg)


def apply_quantization(model: nn.Module, quant_config: QuantConfig | None) -> None:
    """Give every linear layer ``quant_config`` covers its quant method (call on the meta build)."""
    if quant_config is None:
        return
    from pageant.engine.layers.linear import LinearBase
    from pageant.engine.models.base import CausalLM

    if not quant_config.online and isinstance(model, CausalLM) and type(model).rename is not CausalLM.rename:
        raise ValueError(f"{quant_config.name} checkpoints are supported for Llama-family models only so far, "
                         f"not {model.config.architecture}")  # families that re-lay tensors on load
    stacked = getattr(model, "stacked", ())
    for prefix, layer in list(model.named_modules()):
        if not isinstance(layer, LinearBase):
            continue
        head, _, leaf = prefix.rpartition(".")
        parts = [f"{head}.{theirs}" if head else theirs for ours, theirs, _ in stacked if ours == leaf]
        method = quant_config.get_quant_method(layer, prefix, parts or [prefix])
        if method is not None:
            layer.set_quant_method(method)
