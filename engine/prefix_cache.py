"""Content hashes for automatic prefix caching.

A full KV block is identified by a chained hash: ``hash(parent_hash, block token ids)``, where the
first block's parent is the request's *root* hash. The root folds in everything besides the tokens
that changes the KV values: the LoRA adapter (a digest of its files, so a re-registered adapter
with new weights never meets stale entries) and the request's optional ``cache_salt`` (requests
with different salts never share blocks). Because every hash includes its parent, equal hashes mean
equal whole prefixes, not just equal blocks.

Hashes are SHA-256 digests (32 bytes) over a packed, length-delimited encoding: stable across
processes and machines, unlike Python's ``hash``.
"""

from __future__ import annotations

import hashlib
import pathlib
import struct
from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pageant.engine.sequence import Sequence

_DOMAIN = b"pageant-prefix-cache-v1"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def _field(data: bytes) -> bytes:
    return struct.pack("<Q", len(data)) + data


def root_hash(adapter_identity: bytes | None = None, cache_salt: str | None = None) -> bytes:
    """The parent of a request's first block: the base model and no salt give ``BASE_ROOT``."""
    h = hashlib.sha256(_DOMAIN)
    h.update(b"\x01" + _field(adapter_identity) if adapter_identity is not None else b"\x00")
    h.update(b"\x01" + _field(cache_salt.encode("utf-8")) if cache_salt is not None else b"\x00")
    return h.digest()


BASE_ROOT = root_hash()


def hash_block(parent: bytes, token_ids: Seq[int], extra: bytes = b"") -> bytes:
    """The hash of one full block given its parent's hash (or the request's root); ``extra``: the
    content hashes of the images whose placeholder tokens the block holds (see multimodal/inputs.py)."""
    return hashlib.sha256(parent + struct.pack(f"<{len(token_ids)}q", *token_ids) + extra).digest()


def extend_block_hashes(seq: "Sequence", block_size: int, num_blocks: int) -> list[bytes]:
    """Make sure ``seq.block_hashes`` covers its first ``num_blocks`` full blocks (token ids only
    grow, so hashes are computed once each, as blocks fill); returns the list."""
    hashes = seq.block_hashes
    if len(hashes) < num_blocks:
        if num_blocks * block_size > seq.num_tokens:
            raise ValueError(f"sequence has {seq.num_tokens} tokens, fewer than {num_blocks} full blocks")
        parent = hashes[-1] if hashes else seq.request.cache_root
        tokens, mm = seq.token_ids, seq.request.mm_inputs
        for i in range(len(hashes), num_blocks):
            extra = mm.block_key(i * block_size, (i + 1) * block_size) if mm is not None else b""
            parent = hash_block(parent, tokens[i * block_size : (i + 1) * block_size], extra)
            hashes.append(parent)
    return hashes


def adapter_identity(name: str, int_id: int, path: str, adapter_root: str | None = None) -> bytes:
    """A digest naming a LoRA adapter's weights: its name, id, resolved folder and the content of
    its config and weight files (read once, when the adapter is registered). If the folder cannot
    be read here (e.g. a hub id resolved elsewhere), name, id and path alone identify it."""
    h = hashlib.sha256(b"lora")
    h.update(_field(name.encode("utf-8")) + struct.pack("<q", int_id) + _field(path.encode("utf-8")))
    raw = pathlib.Path(path).expanduser()
    if adapter_root is not None and not raw.is_absolute():
        raw = pathlib.Path(adapter_root).expanduser() / raw
    try:
        folder = raw.resolve()
        for fname in _ADAPTER_FILES:
            f = folder / fname
            if f.is_file():
                with open(f, "rb") as fh:
                    h.update(_field(fname.encode()) + hashlib.file_digest(fh, "sha256").digest())
    except OSError:
        pass
    return h.digest()
