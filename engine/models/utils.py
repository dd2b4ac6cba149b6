"""Weight loading shared by the model families (vLLM's ``load_weights`` loop, written once).

A family lists how checkpoint names map onto its merged parameters (``stacked`` tuples of
``(our fragment, checkpoint fragment, shard_id)``) and may rename or transform tensors first;
every tensor then goes through the ``weight_loader`` of the module that owns its parameter. Loaded keys are
``"name"`` or ``"name:shard"``; ``expected_keys`` lists what a complete checkpoint fills, so the
loader can name what is missing.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from pageant.engine.layers.attention import find_attention, kv_scale_target
from pageant.engine.layers.parallel import PPMissingLayer

Stacked = tuple[tuple[str, str, object], ...]
SKIP = object()  # a rename hook returns it for checkpoint tensors the model does not use


def _default_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} does not fit the parameter's {tuple(param.shape)}")
    param.data.copy_(loaded.to(param.dtype))


def load_stacked(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: Stacked = (),
    rename: Callable[[str, torch.Tensor], "tuple[str, torch.Tensor] | object"] | None = None,
) -> set[str]:
    """Load ``(checkpoint name, tensor)`` pairs into ``model``; returns the keys filled.

    ``rename(name, tensor)`` may return a new ``(name, tensor)`` (our naming, a re-laid tensor), a
    ``(parameter name, tensor, shard_id)`` that bypasses ``stacked``, or ``SKIP``. A name that matches no parameter, or a tensor that does not fit, raises ``ValueError``.
    """
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    # layers another pipeline stage holds: their tensors are not this rank's to load
    elsewhere = tuple(f"{n}." for n, m in modules.items() if isinstance(m, PPMissingLayer))
    loaded: set[str] = set()
    for name, tensor in weights:
        if "rotary_emb.inv_freq" in name or name.endswith((".masked_bias", ".attn.bias")):
            continue
        given: list = []
        if rename is not None:
            renamed = rename(name, tensor)
            if renamed is SKIP:
                continue
            name, tensor, *given = renamed  # a 3-tuple also names the parameter's shard
        if not given and (kv_scale := kv_scale_target(name)) is not None:  # an attention layer's k/v_scale
            _load_kv_scale(modules, elsewhere, name, tensor, *kv_scale)
            continue
        target, shard = name, None
        if given:
            shard = given[0]
        else:
            for ours, theirs, shard_id in stacked:
                if f".{theirs}." in name:
                    target, shard = name.replace(f".{theirs}.", f".{ours}."), shard_id
                    break
        param = params.get(target)
        if param is None and elsewhere and target.startswith(elsewhere):
            continue
        if param is None:
            raise ValueError(f"unexpected weight {name!r} (no parameter {target!r} in the model)")
        owner = modules[target.rpartition(".")[0]]
        loader = getattr(owner, "weight_loader", _default_loader)
        try:
            if shard is None:
                loader(param, tensor)
            else:  # a tuple shard (MoE: expert id, shard id) spreads over the loader's arguments
                loader(param, tensor, *shard) if isinstance(shard, tuple) else loader(param, tensor, shard)
        except ValueError as exc:
            raise ValueError(f"weight {name!r}: {exc}") from None
        shard_ids = _shard_ids(owner, target)
        if shard is None and shard_ids:
            loaded.update(f"{target}:{s}" for s in shard_ids)
        else:
            loaded.add(target if shard is None else f"{target}:{shard}")
    return loaded


def _load_kv_scale(modules: dict[str, nn.Module], elsewhere: tuple[str, ...], name: str, tensor: torch.Tensor,
                   path: str, scales: tuple[str, ...]) -> None:
    """A KV-cache scale (see ``kv_scale_target``) into the ``Attention`` layer at ``path``."""
    attn = find_attention(modules, path)
    if attn is None:
        if elsewhere and f"{path}.".startswith(elsewhere):  # another pipeline stage's layer
            return
        raise ValueError(f"unexpected KV-cache scale {name!r} (no attention layer at {path!r} in the model)")
    for scale in scales:  # none for query / probability scales, which FP8 attention math would use
        try:
            attn.load_kv_scale(scale, tensor)
        except ValueError as exc:
            raise ValueError(f"weight {name!r}: {exc}") from None


def _shard_ids(owner: nn.Module, param_name: str) -> tuple | None:
    """The shards a parameter is filled from: its module's ``shard_ids`` (a tuple, or a callable of
    the parameter's own name for modules whose parameters differ)."""
    ids = getattr(owner, "shard_ids", None)
    return ids(param_name.rpartition(".")[2]) if callable(ids) else ids


def expected_keys(model: nn.Module, skip: Iterable[str] = ()) -> set[str]:
    """Every key a complete checkpoint fills (merged parameters once per shard)."""
    skipped = set(skip)
    modules = dict(model.named_modules())
    keys: set[str] = set()
    for name, param in model.named_parameters():
        if name in skipped:
            continue
        shard_ids = _shard_ids(modules[name.rpartition(".")[0]], name)
        keys.update(f"{name}:{s}" for s in shard_ids) if shard_ids else keys.add(name)
    return keys


def per_head_to_blocks(tensor: torch.Tensor, num_groups: int, sizes: tuple[int, ...], head_dim: int) -> torch.Tensor:
    """Re-lay fused qkv rows ``[group][part][head_dim]`` as ``[part][group][head_dim]``.

    ``num_groups`` groups each hold ``sizes[i]`` heads of part ``i`` (e.g. GPT-NeoX: groups = heads,
    sizes = (1, 1, 1); Falcon's new layout: groups = KV heads, sizes = (heads/kv, 1, 1)). The result
    is ``[q | k | v]`` as ``QKVParallelLinear`` expects. Works for weights ``[rows, in]`` and biases.
    """
    rest = tensor.shape[1:]
    grouped = tensor.reshape(num_groups, sum(sizes), head_dim, *rest)  # [groups, heads per group, d, ...]
    parts = grouped.split(list(sizes), dim=1)
    return torch.cat([p.reshape(-1, *rest) for p in parts], dim=0)
