"""KV store: chunk KV cached in tiers (memory over disk by default), bound to one model.

`KVBackend` is one tier; `TieredStore` stacks tiers fastest first, promotes hits
upward and writes through; `KVStore` builds the usual memory-over-disk stack.
"""

from .backend import BackendStats, KVBackend
from .codec import DamagedEntry
from .disk import DiskBackend
from .keys import STORAGE_DTYPES, entry_key, resolve_dtype
from .kvstore import KVStore
from .memory import MemoryBackend
from .tiered import StoreStats, TieredStore

__all__ = [
    "STORAGE_DTYPES",
    "BackendStats",
    "DamagedEntry",
    "DiskBackend",
    "KVBackend",
    "KVStore",
    "MemoryBackend",
    "StoreStats",
    "TieredStore",
    "entry_key",
    "resolve_dtype",
]
