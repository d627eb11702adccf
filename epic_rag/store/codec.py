"""Bytes of one stored entry: the format every persistent tier writes and reads.

An entry is a safetensors blob with tensors ``token_ids``, ``keys`` and ``values``
(``context_ids`` for an entry compiled after other text, and ``context_spans`` when that
text was linked from cached KV; ``key_scale`` and
``value_scale`` for an int8 one) and metadata ``format`` (version), ``fingerprint``
(the model that made it) and ``sha256`` (of the tensors' bytes, in that order). The
checksum catches bit flips that still parse; the version lets a later format refuse old
bytes instead of misreading them. Float entries are written as format "1", exactly as
before int8 existed; int8 ones as "2", which a reader of "1" alone refuses rather than
serving int8 numbers as K/V.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..kv import ChunkKV
from .backend import BackendStats
from .keys import entry_key

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"  # float K/V
INT8_FORMAT_VERSION = "2"  # int8 K/V with fp32 key_scale and value_scale


class DamagedEntry(ValueError):
    """Stored bytes that cannot be trusted as an entry; the message says why."""


def encode(entry: ChunkKV, fingerprint: str) -> bytes:
    """`entry`, made by the model `fingerprint`, as safetensors bytes."""
    tensors = {
        "token_ids": entry.token_ids.detach().cpu().contiguous(),  # [n] int64
        "keys": entry.keys.detach().cpu().contiguous(),  # [layers, kv_heads, n, head_dim]
        "values": entry.values.detach().cpu().contiguous(),  # [layers, kv_heads, n, head_dim]
    }
    if entry.context_ids is not None:
        tensors["context_ids"] = entry.context_ids.detach().cpu().contiguous()  # [m] int64
    if entry.context_spans is not None:
        tensors["context_spans"] = entry.context_spans.detach().cpu().contiguous()  # [s] int64
    if entry.quantized:
        tensors["key_scale"] = entry.key_scale.detach().cpu().contiguous()  # [layers, kv_heads, 1, head_dim]
        tensors["value_scale"] = entry.value_scale.detach().cpu().contiguous()  # [layers, kv_heads, n, 1]
    metadata = {"format": _format_of(entry), "fingerprint": fingerprint, "sha256": _checksum(tensors)}
    return st_save(tensors, metadata=metadata)


def decode(blob: bytes, key: str | None = None) -> tuple[ChunkKV, str]:
    """(entry, fingerprint) from `encode` bytes; raises DamagedEntry if they cannot be trusted.

    With `key`, the entry must also be the one that key names, so a file copied or
    renamed to another key is refused rather than served for the wrong tokens.
    """
    try:
        tensors = st_load(blob)
        metadata = _metadata(blob)
        entry = ChunkKV(
            tensors["token_ids"],
            tensors["keys"],
            tensors["values"],
            tensors.get("context_ids"),
            tensors.get("key_scale"),
            tensors.get("value_scale"),
            tensors.get("context_spans"),
        )
        checksum = _checksum(tensors)
    except (SafetensorError, ValueError, KeyError, RuntimeError, struct.error) as err:
        raise DamagedEntry(f"not a readable entry ({type(err).__name__}: {err})") from err
    if metadata.get("format") != _format_of(entry):
        raise DamagedEntry(f"format {metadata.get('format')!r}, expected {_format_of(entry)!r}")
    if metadata.get("sha256") != checksum:
        raise DamagedEntry("checksum mismatch: the tensor bytes changed after writing")
    fingerprint = metadata.get("fingerprint")
    if not fingerprint:
        raise DamagedEntry("no model fingerprint in the metadata")
    if key is not None and entry_key(fingerprint, entry.token_ids, entry.context_ids, entry.context_spans) != key:
        raise DamagedEntry("content does not match its key (copied or renamed)")
    return entry, fingerprint


def decode_read(
    blob: bytes | None, key: str, stats: BackendStats, drop: Callable[[], object], where: str
) -> tuple[ChunkKV, str] | None:
    """What a persistent tier read under `key` (None when absent), counted in `stats`. A damaged
    entry is never returned: `drop()` deletes it, it counts as corrupted and a miss, and a
    WARNING names `where` it was."""
    if blob is None:
        stats.misses += 1
        return None
    stats.reads += 1
    try:
        found = decode(blob, key=key)
    except DamagedEntry as err:
        drop()
        stats.corrupted += 1
        stats.misses += 1
        log.warning("deleted damaged KV entry %s: %s", where, err)
        return None
    stats.hits += 1
    return found


def _format_of(entry: ChunkKV) -> str:
    """The format version an entry of this kind is written in."""
    return INT8_FORMAT_VERSION if entry.quantized else FORMAT_VERSION


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the raw bytes of token_ids, keys, values (context_ids, key_scale, value_scale,
    context_spans), in that order."""
    digest = hashlib.sha256()
    for name in ("token_ids", "keys", "values", "context_ids", "key_scale", "value_scale", "context_spans"):
        if name in tensors:
            digest.update(tensors[name].contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _metadata(blob: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors byte string (safetensors' own loader drops it)."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + header_len])
    return header.get("__metadata__") or {}
