"""epic-rag: position-independent context caching (EPIC) for retrieval-augmented generation.

Each document chunk's KV is computed once, alone, and reused at query time in any
position and order: keys are re-rotated to their new positions and only the first
few tokens of each chunk (plus the question) are recomputed.

Names are imported on first use (PEP 562), so `import epic_rag` and the `epic-rag`
command start in milliseconds and torch loads only when a model or tensor is needed.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module of this package that defines it
_EXPORTS = {
    "AttentionRescale": "rescale",
    "AttnLink": "policies",
    "CacheBlend": "policies",
    "ChunkKV": "kv",
    "DEFAULT_MODEL": "offline",
    "DEFAULT_POLICY": "policy_spec",
    "DiskBackend": "store",
    "EpicEngine": "engine",
    "FullRecompute": "policies",
    "FullReuse": "policies",
    "Generation": "results",
    "KVBackend": "store",
    "KVStore": "store",
    "LayerHook": "forward",
    "LayerState": "forward",
    "MemoryBackend": "store",
    "OFFLINE_MODELS": "offline",
    "PolicySpec": "policy_spec",
    "PositionalKVCache": "cache",
    "PrefillResult": "results",
    "PrefillStats": "results",
    "PrefixOnly": "policies",
    "Probe": "policies",
    "PromptLayout": "layout",
    "QueryGuided": "policies",
    "RecomputePolicy": "policies",
    "Rescaled": "policies",
    "SamplingParams": "sampling",
    "Segment": "layout",
    "StoreStats": "store",
    "TieredStore": "store",
    "TokenStream": "results",
    "UnknownChunkError": "store.registry",
    "UnsupportedModelError": "model",
    "check_supported": "model",
    "fingerprint": "model",
    "load_model": "model",
    "parse_policy": "policies",
    "parse_spec": "policy_spec",
    "rotate_keys": "kv",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'epic_rag' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from .cache import PositionalKVCache
    from .engine import EpicEngine
    from .forward import LayerHook, LayerState
    from .kv import ChunkKV, rotate_keys
    from .layout import PromptLayout, Segment
    from .model import UnsupportedModelError, check_supported, fingerprint, load_model
    from .offline import DEFAULT_MODEL, OFFLINE_MODELS
    from .policies import (
        DEFAULT_POLICY,
        AttnLink,
        CacheBlend,
        FullRecompute,
        FullReuse,
        PrefixOnly,
        Probe,
        QueryGuided,
        RecomputePolicy,
        Rescaled,
        parse_policy,
    )
    from .rescale import AttentionRescale
    from .results import Generation, PrefillResult, PrefillStats, TokenStream
    from .sampling import SamplingParams
    from .store import DiskBackend, KVBackend, KVStore, MemoryBackend, StoreStats, TieredStore
    from .store.registry import UnknownChunkError
