"""Image features in a step: which go where (``MultiModalBatch``), the encoder cache, the merge.

The scheduler may cut a prompt anywhere, also inside an image's placeholder tokens (chunked
prefill). ``build_batch`` (host side, from the ``SchedulerOutput``) lists, per image touched by the
step, the slice of its features the step's tokens need and where they go in the flat batch.
``EncoderCache.forward_inputs`` (device side) runs the vision encoder once, batched, on the step's
images that are not cached, keeps their features (keyed by the image's content hash, LRU within
``capacity_tokens``) so the next chunk, a preempted request's recompute or another request with
the same image does not re-encode, and writes the features over the token embeddings.
With ``enabled=False`` nothing is kept: every step re-encodes the images it touches.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from pageant.engine.multimodal.inputs import MultiModalItem


@dataclass(frozen=True)
class FeatureSlice:
    """Features ``[feat_start, feat_end)`` of ``item`` go to flat tokens from ``flat_start`` on."""

    item: MultiModalItem
    feat_start: int
    feat_end: int
    flat_start: int


@dataclass(frozen=True)
class MultiModalBatch:
    """A step's image slices and (M-RoPE models) the ``[3, num_tokens]`` positions."""

    slices: tuple[FeatureSlice, ...]
    mrope_positions: np.ndarray | None = None  # [3, num_tokens] int64


def build_batch(scheduled, query_start_loc: np.ndarray, positions: np.ndarray) -> MultiModalBatch | None:
    """The step's ``MultiModalBatch``; None when no scheduled request has images (text path unchanged)."""
    requests = [s.seq.request.mm_inputs for s in scheduled]
    if all(mm is None for mm in requests):
        return None
    slices: list[FeatureSlice] = []
    for i, (s, mm) in enumerate(zip(scheduled, requests)):
        if mm is None:
            continue
        end = s.start + s.num_new_tokens
        for _, it in mm.overlapping(s.start, end):
            a, b = max(s.start, it.offset), min(end, it.end)
            slices.append(FeatureSlice(it, a - it.offset, b - it.offset, int(query_start_loc[i]) + a - s.start))
    mrope = None
    if any(mm is not None and mm.mrope_positions is not None for mm in requests):
        mrope = np.repeat(positions[None, :], 3, axis=0)  # [3, num_tokens]: text tokens on all axes
        for i, (s, mm) in enumerate(zip(scheduled, requests)):
            if mm is None or mm.mrope_positions is None:
                continue
            lo, n = int(query_start_loc[i]), s.num_new_tokens
            pos = positions[lo : lo + n]  # [n] this sequence's 1-D positions
            prompt = mm.mrope_positions.shape[1]
            in_prompt = pos < prompt
            block = np.repeat((pos + mm.mrope_delta)[None, :], 3, axis=0)  # generated tokens
            block[:, in_prompt] = mm.mrope_positions[:, pos[in_prompt]]
            mrope[:, lo : lo + n] = block
    if not slices and mrope is None:
        return None
    return MultiModalBatch(tuple(slices), mrope)


class EncoderCache:
    """Vision features by image content hash (LRU within ``capacity_tokens`` feature rows).

    Counters: ``num_encoder_runs`` (batched encoder calls), ``num_encoded_images`` (images
    encoded), ``num_hits`` (images a step needed that were cached)."""

    def __init__(self, capacity_tokens: int = 16384, enabled: bool = True):
        self.capacity_tokens = capacity_tokens
        self.enabled = enabled
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._tokens = 0
        self.num_encoder_runs = 0
        self.num_encoded_images = 0
        self.num_hits = 0

    def __len__(self) -> int:
        return len(self._cache)

    def features(self, model, items: list[MultiModalItem]) -> dict[bytes, torch.Tensor]:
        """Each item's ``[num_image_tokens, hidden]`` features: cached, or encoded now in one call."""
        found: dict[bytes, torch.Tensor] = {}
        missing: dict[bytes, MultiModalItem] = {}
        for it in items:
            if it.hash in found or it.hash in missing:
                continue
            cached = self._cache.get(it.hash)
            if cached is not None:
                self._cache.move_to_end(it.hash)
                found[it.hash] = cached
                self.num_hits += 1
            else:
                missing[it.hash] = it
        if missing:
            todo = list(missing.values())
            encoded = model.encode_images([it.data for it in todo])
            self.num_encoder_runs += 1
            self.num_encoded_images += len(todo)
            for it, feats in zip(todo, encoded):
                if feats.shape[0] != it.length:
                    raise ValueError(f"the encoder made {feats.shape[0]} features for {it.length} image tokens")
                found[it.hash] = feats
                self._store(it.hash, feats)
        return found

    def _store(self, key: bytes, feats: torch.Tensor) -> None:
        if not self.enabled or feats.shape[0] > self.capacity_tokens:
            return
        self._cache[key] = feats
        self._tokens += feats.shape[0]
        while self._tokens > self.capacity_tokens:
            _, old = self._cache.popitem(last=False)
            self._tokens -= old.shape[0]

    def clear(self) -> None:
        self._cache.clear()
        self._tokens = 0

    def forward_inputs(self, model, input_ids: torch.Tensor, positions: torch.Tensor,
                       batch: MultiModalBatch) -> tuple[torch.Tensor, dict]:
        """``(positions, extra forward kwargs)`` for a step with images: the embeddings with the
        image features merged in (``inputs_embeds``), M-RoPE positions where the model uses them."""
        kwargs = {}
        if batch.slices:
            embeds = model.get_input_embeddings(input_ids)  # [num_tokens, hidden]
            feats = self.features(model, [s.item for s in batch.slices])
            for s in batch.slices:
                rows = feats[s.item.hash][s.feat_start : s.feat_end]  # [count, hidden]
                embeds[s.flat_start : s.flat_start + rows.shape[0]] = rows.to(embeds.dtype)
            kwargs["inputs_embeds"] = embeds
        if batch.mrope_positions is not None:
            positions = torch.from_numpy(batch.mrope_positions).to(input_ids.device)  # [3, num_tokens]
        return positions, kwargs
