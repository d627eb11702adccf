"""KV store: chunk KV cached in tiers (memory over disk by default, over Redis when shared), bound to one model.

`KVBackend` is one tier; `TieredStore` stacks tiers fastest first, promotes hits
upward and writes through; `KVStore` builds the usual memory-over-disk stack.
"""

from .backend import BackendStats, KVBackend
from .codec import DamagedEntry
from .disk import DiskBackend
from .keys import STORAGE_DTYPES, entry_key, kv_bytes_per_token, resolve_dtype
from .kvstore import KVStore
from .memory import MemoryBackend
from .redis import KVTierError, RedisBackend, redact
from .tiered import StoreStats, TieredStore

__all__ = [
    "STORAGE_DTYPES",
    "BackendStats",
    "DamagedEntry",
    "DiskBackend",
    "KVBackend",
    "KVStore",
    "KVTierError",
    "MemoryBackend",
    "RedisBackend",
    "StoreStats",
    "TieredStore",
    "entry_key",
    "kv_bytes_per_token",
    "redact",
    "resolve_dtype",
]
