"""epic-rag: position-independent context caching (EPIC) for retrieval-augmented generation.

Each document chunk's KV is computed once, alone, and reused at query time in any
position and order: keys are re-rotated to their new positions and only the first
few tokens of each chunk (plus the question) are recomputed.
"""

from .cache import PositionalKVCache
from .engine import EpicEngine, Generation, PrefillResult, PrefillStats, TokenStream, UnknownChunkError
from .kv import ChunkKV, rotate_keys
from .layout import PromptLayout, Segment
from .model import UnsupportedModelError, check_supported, fingerprint, load_model
from .offline import DEFAULT_MODEL, OFFLINE_MODELS
from .policies import AttnLink, CacheBlend, FullRecompute, FullReuse, PrefixOnly, RecomputePolicy, parse_policy
from .sampling import SamplingParams
from .store import KVStore, StoreStats

__version__ = "0.1.0"

__all__ = [
    "AttnLink",
    "CacheBlend",
    "ChunkKV",
    "DEFAULT_MODEL",
    "EpicEngine",
    "FullRecompute",
    "FullReuse",
    "Generation",
    "KVStore",
    "OFFLINE_MODELS",
    "PositionalKVCache",
    "PrefillResult",
    "PrefillStats",
    "PrefixOnly",
    "PromptLayout",
    "RecomputePolicy",
    "SamplingParams",
    "Segment",
    "StoreStats",
    "TokenStream",
    "UnknownChunkError",
    "UnsupportedModelError",
    "check_supported",
    "fingerprint",
    "load_model",
    "parse_policy",
    "rotate_keys",
]
