"""epic-rag: position-independent context caching (EPIC) for retrieval-augmented generation.

Each document chunk's KV is computed once, alone, and reused at query time in any
position and order: keys are re-rotated to their new positions and only the first
few tokens of each chunk (plus the question) are recomputed.
"""

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
from .prompt import UnknownChunkError
from .rescale import AttentionRescale
from .results import Generation, PrefillResult, PrefillStats, TokenStream
from .sampling import SamplingParams
from .store import DiskBackend, KVBackend, KVStore, MemoryBackend, StoreStats, TieredStore

__version__ = "0.1.0"

__all__ = [
    "AttentionRescale",
    "AttnLink",
    "CacheBlend",
    "ChunkKV",
    "DEFAULT_MODEL",
    "DEFAULT_POLICY",
    "DiskBackend",
    "EpicEngine",
    "FullRecompute",
    "FullReuse",
    "Generation",
    "KVBackend",
    "KVStore",
    "LayerHook",
    "LayerState",
    "MemoryBackend",
    "OFFLINE_MODELS",
    "PositionalKVCache",
    "PrefillResult",
    "PrefillStats",
    "PrefixOnly",
    "Probe",
    "PromptLayout",
    "QueryGuided",
    "RecomputePolicy",
    "Rescaled",
    "SamplingParams",
    "Segment",
    "StoreStats",
    "TieredStore",
    "TokenStream",
    "UnknownChunkError",
    "UnsupportedModelError",
    "check_supported",
    "fingerprint",
    "load_model",
    "parse_policy",
    "rotate_keys",
]
