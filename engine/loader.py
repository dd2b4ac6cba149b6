"""Find a checkpoint (local folder or Hugging Face hub id) and load its safetensors weights."""

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
from pageant.engine.llama import LlamaForCausalLM

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


def load_model(
    path: pathlib.Path,
    model_config: ModelConfig,
    ops: ModuleType,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
) -> LlamaForCausalLM:
    """Build the model without initialising it, then fill every parameter from the checkpoint
    (with a progress bar). Raises ``ValueError`` if a parameter is missing from the checkpoint."""
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config, ops, max_position)
    model = model.to_empty(device=device).to(dtype)
    if model_config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from pageant.engine.rope import cos_sin_cache

    model.cos_sin_cache = cos_sin_cache(model_config.rope, model_config.head_dim, max_position).to(device)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    files = safetensors_files(path)
    with torch.no_grad(), tqdm(total=len(files), desc="Loading weights", unit="file", leave=False) as bar:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    if "rotary_emb.inv_freq" in name:
                        continue
                    if model_config.tie_word_embeddings and name == "lm_head.weight":
                        continue
                    tensor = f.get_tensor(name)
                    target, rows = _target(model, name)
                    if target not in params:
                        raise ValueError(f"unexpected weight {name!r} in {file.name}")
                    param = params[target]
                    dst = param.data if rows is None else param.data[rows]
                    if dst.shape != tensor.shape:
                        raise ValueError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}")
                    dst.copy_(tensor.to(dtype))
                    loaded.add(name if rows is None else f"{target}:{rows.start}")
            bar.update(1)
    expected = _expected_names(model)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return model.eval()


def _target(model: LlamaForCausalLM, name: str) -> tuple[str, slice | None]:
    for ours, theirs, shard in model.stacked_params:
        if f".{theirs}." in name:
            target = name.replace(theirs, ours)
            return target, model.shard_slice(target, shard)
    return name, None


def _expected_names(model: LlamaForCausalLM) -> set[str]:
    names: set[str] = set()
    for name, _ in model.named_parameters():
        merged = [(ours, shard) for ours, _, shard in model.stacked_params if f".{ours}." in name]
        if merged:
            names.update(f"{name}:{model.shard_slice(name, shard).start}" for _, shard in merged)
        else:
            names.add(name)
    return names


@torch.no_grad()
def build_dummy_model(
    model_config: ModelConfig,
    ops: ModuleType,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    seed: int = 0,
) -> LlamaForCausalLM:
    """``load_format="dummy"``: the model with random weights made directly on ``device`` (no
    weight files, no host copy): linear and embedding weights ~ N(0, 0.02), norms 1, biases 0."""
    with torch.device("meta"):
        model = LlamaForCausalLM(model_config, ops, max_position)
    model = model.to_empty(device=device).to(dtype)
    if model_config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from pageant.engine.rope import cos_sin_cache

    model.cos_sin_cache = cos_sin_cache(model_config.rope, model_config.head_dim, max_position).to(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:  # drawn in float32 and cast, so bf16/fp16 models get the same values on every device kind
            param.copy_(torch.empty(param.shape, device=device).normal_(0.0, 0.02, generator=generator))
    return model.eval()
