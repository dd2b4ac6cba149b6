"""Load and validate a PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).

Everything that can be wrong with an adapter is found here, before it touches the engine, and
raised as ``LoRAAdapterError`` (a ``ValueError`` whose message is fit for an HTTP 400 body):
missing or unreadable files, pickle (``.bin``) weights, a path outside the allowed adapter root
(``..``, symlinks out, absolute paths elsewhere), a rank above ``max_lora_rank``, target modules the
model lacks, unsupported PEFT features (DoRA, bias, modules_to_save, ...), shapes that do not match
the base model.

The loaded ``LoRAAdapter`` holds CPU tensors with the scaling (``lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora``) already folded into B.
"""

from __future__ import annotations

import json
import math
import pathlib
import re
from dataclasses import dataclass, field

import torch

from pageant.engine.adapters.spec import LoRAModelSpec

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _key_pattern(spec: LoRAModelSpec) -> re.Pattern:
    """PEFT weight names of the spec's layers: ``[base_model.model.]<prefix>.N.<parent>.<proj>.lora_A|B``."""
    return re.compile(
        rf"^(?:base_model\.model\.)?{re.escape(spec.layer_prefix)}\.(\d+)\.([\w.]+)\.(\w+)\.lora_(A|B)(?:\.[\w-]+)?\.weight$"
    )


class LoRAAdapterError(ValueError):
    """An adapter that cannot be loaded; the message says why and is fit for an HTTP 400 body."""


class LoRANotFoundError(LoRAAdapterError):
    """The named adapter is not loaded (an HTTP 404 where the server maps it)."""


@dataclass
class LoRAAdapter:
    """A validated adapter on the CPU.

    ``weights[(layer, proj)] = (lora_a [rank, in_features], lora_b [out_features, rank])`` with the
    scaling folded into ``lora_b`` (kept in float32); ``rank`` is the largest rank of any module (at most the cap).
    """

    name: str
    int_id: int
    path: str
    rank: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(sorted({proj for _, proj in self.weights}))

    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _download(repo_id: str) -> pathlib.Path:
    """A Hugging Face hub adapter repo's config and safetensors weights (cached by huggingface_hub)."""
    import os

    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(snapshot_download(
            repo_id=repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "adapter_model.bin"],
            token=os.environ.get("HF_TOKEN") or None,
        ))
    except Exception as exc:  # network, auth, missing repo: one clear message
        raise LoRAAdapterError(
            f"LoRA adapter {repo_id!r} is not a local folder and could not be downloaded from the "
            f"Hugging Face hub: {type(exc).__name__}: {exc}"
        ) from None


def resolve_adapter_dir(path: str, adapter_root: str | pathlib.Path | None) -> pathlib.Path:
    """The adapter folder ``path`` with symlinks resolved, checked to lie inside ``adapter_root``.

    A relative ``path`` is taken relative to ``adapter_root`` (or the working directory when there
    is no root). With no root, any local folder is allowed (offline use), and a ``org/name`` that
    is not a local path is downloaded from the Hugging Face hub (as vLLM does); with a root (a
    server), only folders under it are.
    """
    if not isinstance(path, str) or not path.strip():
        raise LoRAAdapterError("lora_path must be a non-empty string")
    if "\x00" in path:
        raise LoRAAdapterError("lora_path contains a NUL byte")
    raw = pathlib.Path(path).expanduser()
    if adapter_root is not None:
        root = pathlib.Path(adapter_root).expanduser().resolve()
        real = (raw if raw.is_absolute() else root / raw).resolve()
        if real != root and root not in real.parents:
            raise LoRAAdapterError(
                f"lora_path {path!r} is outside the allowed adapter root {str(root)!r}"
            )
    else:
        real = raw.resolve()
        if not real.exists() and _HUB_ID.fullmatch(path):
            real = _download(path)
    if not real.exists():
        raise LoRAAdapterError(f"LoRA adapter folder {path!r} does not exist")
    if not real.is_dir():
        raise LoRAAdapterError(f"lora_path {path!r} is not a folder (expected a PEFT adapter folder)")
    return real


def _file_inside(folder: pathlib.Path, name: str, adapter_root, path: str) -> pathlib.Path | None:
    """``folder/name`` if it exists, after checking a symlinked file does not point out of the root."""
    f = folder / name
    if not f.exists():
        return None
    real = f.resolve()
    if adapter_root is not None:
        root = pathlib.Path(adapter_root).expanduser().resolve()
        if root not in real.parents:
            raise LoRAAdapterError(f"{name} of adapter {path!r} links outside the allowed adapter root")
    if not real.is_file():
        raise LoRAAdapterError(f"{name} of adapter {path!r} is not a file")
    return real


def _read_config(folder: pathlib.Path, adapter_root, path: str) -> dict:
    cfg_file = _file_inside(folder, CONFIG_NAME, adapter_root, path)
    if cfg_file is None:
        raise LoRAAdapterError(f"LoRA adapter {path!r} has no {CONFIG_NAME}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LoRAAdapterError(f"{CONFIG_NAME} of adapter {path!r} is not valid JSON: {exc}") from None
    if not isinstance(cfg, dict):
        raise LoRAAdapterError(f"{CONFIG_NAME} of adapter {path!r} must be a JSON object")
    return cfg


def _check_config(cfg: dict, max_lora_rank: int, path: str, projections: tuple[str, ...]) -> None:
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAAdapterError(f"adapter {path!r} is a {peft_type} adapter; only LoRA is supported")
    unsupported = {
        "use_dora": "DoRA", "fan_in_fan_out": "fan_in_fan_out (Conv1D) layers", "lora_bias": "LoRA bias",
    }
    for key, what in unsupported.items():
        if cfg.get(key):
            raise LoRAAdapterError(f"adapter {path!r} uses {what}, which is not supported")
    if cfg.get("bias", "none") not in ("none", None):
        raise LoRAAdapterError(f"adapter {path!r} trains biases (bias={cfg['bias']!r}); only bias='none' is supported")
    if cfg.get("modules_to_save"):
        raise LoRAAdapterError(
            f"adapter {path!r} has modules_to_save {cfg['modules_to_save']!r}; full-weight modules are not supported"
        )
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise LoRAAdapterError(f"adapter {path!r} has an invalid rank r={r!r}")
    alpha = cfg.get("lora_alpha", r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise LoRAAdapterError(f"adapter {path!r} has an invalid lora_alpha={alpha!r}")
    ranks = [r, *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > max_lora_rank:
        raise LoRAAdapterError(
            f"adapter {path!r} has rank {max(ranks)}, above the engine's max_lora_rank={max_lora_rank}"
        )
    targets = cfg.get("target_modules")
    if isinstance(targets, (list, tuple, set)):
        lacking = sorted(str(t) for t in targets if str(t).split(".")[-1] not in projections)
        if lacking:
            raise LoRAAdapterError(
                f"adapter {path!r} targets modules the model lacks or LoRA here does not support: {lacking}; "
                f"supported: {list(projections)}"
            )


def _pattern_value(pattern: dict, module_name: str, default):
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name by suffix or regex."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _scaling(cfg: dict, module_name: str) -> tuple[int, float]:
    r = _pattern_value(cfg.get("rank_pattern"), module_name, cfg["r"])
    alpha = _pattern_value(cfg.get("alpha_pattern"), module_name, cfg.get("lora_alpha", cfg["r"]))
    return r, (alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r)


def _read_weights(folder: pathlib.Path, adapter_root, path: str) -> dict[str, torch.Tensor]:
    weights = _file_inside(folder, WEIGHTS_NAME, adapter_root, path)
    if weights is None:
        if (folder / "adapter_model.bin").exists() or (folder / "adapter_model.pt").exists():
            raise LoRAAdapterError(
                f"adapter {path!r} has pickle weights (adapter_model.bin), which are refused for safety; "
                f"convert them to {WEIGHTS_NAME}"
            )
        raise LoRAAdapterError(f"LoRA adapter {path!r} has no {WEIGHTS_NAME}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoRAAdapterError(f"{WEIGHTS_NAME} of adapter {path!r} cannot be read: {exc}") from None


def load_peft_adapter(
    name: str,
    int_id: int,
    path: str,
    spec: LoRAModelSpec,
    *,
    max_lora_rank: int,
    adapter_root: str | pathlib.Path | None = None,
) -> LoRAAdapter:
    """Read, validate and scale the adapter at ``path`` for a base model described by ``spec``."""
    folder = resolve_adapter_dir(path, adapter_root)
    cfg = _read_config(folder, adapter_root, path)
    _check_config(cfg, max_lora_rank, path, spec.projections)
    tensors = _read_weights(folder, adapter_root, path)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    key_pattern = _key_pattern(spec)
    for key, tensor in tensors.items():
        m = key_pattern.match(key)
        if m is None:
            what = "DoRA magnitude" if "magnitude" in key else "weight"
            raise LoRAAdapterError(
                f"adapter {path!r} has a {what} {key!r} on a module this engine cannot apply LoRA to "
                f"(supported: {list(spec.projections)} of the decoder layers)"
            )
        layer, parent, proj, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        if proj not in spec.projections or spec.parent(proj) != parent:
            raise LoRAAdapterError(f"adapter {path!r} targets module {parent}.{proj}, which the model lacks")
        if layer >= spec.num_layers:
            raise LoRAAdapterError(
                f"adapter {path!r} has weights for layer {layer}, but the model has {spec.num_layers} layers"
            )
        if not tensor.is_floating_point() or tensor.dim() != 2:
            raise LoRAAdapterError(f"adapter weight {key!r} must be a 2-D float tensor")
        pairs.setdefault((layer, proj), {})[ab] = tensor
    if not pairs:
        raise LoRAAdapterError(f"adapter {path!r} has no LoRA weights")
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    max_rank = 0
    for (layer, proj), ab in sorted(pairs.items()):
        module = spec.module_name(layer, proj)
        if set(ab) != {"A", "B"}:
            raise LoRAAdapterError(f"adapter {path!r} has lora_A without lora_B (or the reverse) for {module}")
        a, b = ab["A"], ab["B"]
        r, scaling = _scaling(cfg, module)
        in_features, out_features = spec.shape(proj)
        if a.shape[0] != b.shape[1] or a.shape[0] != r:
            raise LoRAAdapterError(
                f"adapter {path!r}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}, "
                f"inconsistent with rank {r} from {CONFIG_NAME}"
            )
        if r > max_lora_rank:
            raise LoRAAdapterError(
                f"adapter {path!r} has rank {r} at {module}, above the engine's max_lora_rank={max_lora_rank}"
            )
        if a.shape[1] != in_features or b.shape[0] != out_features:
            raise LoRAAdapterError(
                f"adapter {path!r} does not fit the base model: {module} expects lora_A [r, {in_features}] "
                f"and lora_B [{out_features}, r], got {list(a.shape)} and {list(b.shape)}"
            )
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise LoRAAdapterError(f"adapter {path!r} has NaN or infinite weights in {module}")
        order = spec.row_order(proj)
        if order is not None:  # the engine re-laid this projection's output rows on load: follow it
            b = b[list(order)]
        weights[(layer, proj)] = (a.contiguous(), (b.float() * scaling).contiguous())
        max_rank = max(max_rank, r)
    return LoRAAdapter(name=name, int_id=int_id, path=str(folder), rank=max_rank, weights=weights)
