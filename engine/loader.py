"""Find a checkpoint (local folder or Hugging Face hub id), build its family's model and load its
safetensors weights (each tensor through its parameter's ``weight_loader``)."""

from __future__ import annotations

import json
import logging
import os
import pathlib
from types import ModuleType

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from pageant.engine.config import ModelConfig
from pageant.engine.layers.layernorm import GemmaRMSNorm
from pageant.engine.layers.parallel import SINGLE, ParallelState
from pageant.engine.layers.quantization import apply_quantization, resolve_quantization
from pageant.engine.models.base import CausalLM
from pageant.engine.models.registry import model_class

logger = logging.getLogger(__name__)

_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def resolve_model_path(model: str, revision: str | None = None, download_dir: str | None = None) -> pathlib.Path:
    """A local folder as is; otherwise ``model`` is a hub id, downloaded (or found in the cache)
    with ``huggingface_hub.snapshot_download`` (``HF_TOKEN`` and ``HF_HOME``/``download_dir`` honoured)."""
    local = pathlib.Path(model).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"{local} has no config.json: not a Hugging Face checkpoint folder")
        return local
    if local.exists() or model.startswith((".", "/")) or model.count("/") > 1:
        raise ValueError(f"model path {model!r} is not a checkpoint folder")
    from huggingface_hub import snapshot_download

    logger.info("downloading %s (revision %s) from the Hugging Face hub", model, revision or "main")
    try:
        path = snapshot_download(
            repo_id=model,
            revision=revision,
            cache_dir=download_dir,
            token=os.environ.get("HF_TOKEN") or None,
            allow_patterns=_HUB_PATTERNS,
        )
    except Exception as exc:  # network, auth, missing repo: one clear message
        raise ValueError(f"could not download model {model!r} from the Hugging Face hub: {exc}") from exc
    return pathlib.Path(path)


def safetensors_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The checkpoint's weight files: those the index names, or every ``*.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / n for n in names]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no safetensors weights found in {path}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"checkpoint shards missing: {missing}")
    return files


def _build(model_config: ModelConfig, ops: ModuleType, dtype: torch.dtype, device: torch.device,
           max_position: int, parallel: ParallelState, quant_config=None) -> CausalLM:
    """The family's model, uninitialised on ``device`` (built on the meta device, then allocated);
    ``quant_config`` gives the linear layers it covers their quantized parameters before allocation."""
    cls = model_class(model_config.architecture)
    with torch.device("meta"):
        model = cls(model_config, ops, max_position, parallel)
        apply_quantization(model, quant_config)
    # float parameters take the model dtype; quantized storage (int, float8 bytes) keeps its own
    model = model.to_empty(device=device)._apply(
        lambda t: t.to(dtype) if t.is_floating_point() and t.element_size() > 1 else t)
    model.tie_weights()  # to_empty un-ties shared parameters
    model.init_buffers(device)
    return model


def load_model(
    path: pathlib.Path,
    model_config: ModelConfig,
    ops: ModuleType,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    parallel: ParallelState = SINGLE,
    quantization: str | None = None,
) -> CausalLM:
    """Build the model without initialising it, then fill every parameter from the checkpoint
    (with a progress bar). Raises ``ValueError`` if a parameter is missing from the checkpoint.

    ``quantization`` (``EngineConfig.quantization``): None detects the checkpoint's
    ``quantization_config``; see ``pageant.engine.layers.quantization``."""
    quant_config = resolve_quantization(model_config.raw, quantization)
    if quant_config is not None and quant_config.name != "fp8" and model_class(model_config.architecture).rename \
            is not CausalLM.rename:
        raise ValueError(f"{quant_config.name} checkpoints are supported for Llama-family models only so far, "
                         f"not {model_config.architecture}")
    model = _build(model_config, ops, dtype, device, max_position, parallel, quant_config)
    files = safetensors_files(path)
    loaded: set[str] = set()

    def tensors(file: pathlib.Path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)

    # disable=None: no bar unless stderr is a terminal (a server's log stays free of bar redraws)
    with torch.no_grad(), tqdm(total=len(files), desc="Loading weights", unit="file", leave=False,
                               disable=None) as bar:
        for file in files:
            try:
                loaded |= model.load_weights(tensors(file))
            except ValueError as exc:
                raise ValueError(f"{file.name}: {exc}") from None
            bar.update(1)
    missing = sorted(model.expected_keys() - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return model.eval()


@torch.no_grad()
def build_dummy_model(
    model_config: ModelConfig,
    ops: ModuleType,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    seed: int = 0,
    parallel: ParallelState = SINGLE,
) -> CausalLM:
    """``load_format="dummy"``: the model with random weights made directly on ``device`` (no
    weight files, no host copy): matrices ~ N(0, 0.02), norm weights 1 (0 for Gemma's ``1 + w``
    norms), biases 0."""
    model = _build(model_config, ops, dtype, device, max_position, parallel)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if "norm" in type(module).__name__.lower():
                param.fill_(0.0 if isinstance(module, GemmaRMSNorm) or pname == "bias" else 1.0)
            elif pname == "bias":
                param.zero_()
            else:  # drawn in float32 and cast, so bf16/fp16 models get the same values on every device kind
                param.copy_(torch.empty(param.shape, device=device).normal_(0.0, 0.02, generator=generator))
    return model.eval()
