"""A shared tier: chunk KV in a Redis server, readable by every process that can reach it.

One Redis key per entry, ``<prefix>:kv:<model>:<entry key>`` where ``<model>`` is 16 hex
digits of the model fingerprint's sha256, holding the `codec` bytes (safetensors with a
sha256 checksum; never pickle). Header and tensors travel in one value, so an LRU
eviction can never leave half an entry. Every read is decoded and checked against its
key; a damaged or truncated value is deleted and reported as a miss.

KV is a cache, always recomputable from its tokens, so the tier fails soft: when the
server is down or unreachable an operation is counted in `errors`, logged once per
outage, and the tier is skipped for `retry_after_s`; then it is tried again, so a
server that comes back is used without restarting anything. A server that refuses
the credentials is a configuration error and raises `KVTierError` at once.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from ..kv import ChunkKV
from .backend import BackendStats, KVBackend
from .codec import decode_read, encode
from .keys import is_entry_key

log = logging.getLogger(__name__)

URL_SCHEMES = ("redis", "rediss", "unix")


class KVTierError(ValueError):
    """A shared KV tier that cannot be used as configured (bad URL, refused credentials)."""


def redact(url: str) -> str:
    """`url` with any password replaced by ``***`` (safe for logs and error messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RedisBackend(KVBackend):
    """Entries in the Redis server at `url` (``redis://[user:password@]host:port/db``).

    `ttl_s` expires an entry that many seconds after it was last written or read
    (None: keep until the server evicts it). `timeout_s` bounds every command, so an
    unreachable server costs at most that per outage window, not per chunk.
    """

    name = "redis"
    persistent = True
    shared = True

    def __init__(
        self,
        url: str,
        ttl_s: int | None = None,
        prefix: str = "epic-rag",
        timeout_s: float = 2.0,
        retry_after_s: float = 2.0,
        require: bool = False,
    ) -> None:
        try:
            import redis
        except ImportError:
            raise KVTierError(
                "a Redis KV tier needs the redis extra (the redis package is not installed): "
                "pip install 'epic-rag[redis]'"
            ) from None

        self._redis = redis
        self.url = redact(url)
        if urlsplit(url).scheme not in URL_SCHEMES:
            raise KVTierError(
                f"KV tier URL {self.url!r} is not a Redis URL: use redis://[user:password@]host:port/db "
                "(rediss:// for TLS, unix:///path/to/socket)"
            )
        if ttl_s is not None and ttl_s <= 0:
            raise KVTierError(f"KV tier TTL must be a positive number of seconds, got {ttl_s}")
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.retry_after_s = retry_after_s
        try:
            self._client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        except ValueError as err:
            raise KVTierError(f"KV tier URL {self.url!r} is malformed: {err}") from None
        self._namespace = ""
        self._stats = BackendStats(self.name)
        self._lock = threading.Lock()
        self._down_until = 0.0  # monotonic time before which the server is not asked again
        self._down = False
        self.check(require)

    def check(self, require: bool = False) -> bool:
        """Ping the server: True when it answers. Refused credentials raise `KVTierError`;
        an unreachable server raises it too with `require`, else is logged and skipped."""
        try:
            self._client.ping()
        except self._redis.AuthenticationError as err:
            raise self._auth_error(err) from None
        except self._redis.ResponseError as err:
            if _is_auth_refusal(err):
                raise self._auth_error(err) from None
            raise KVTierError(f"KV tier at {self.url} answered PING with an error: {err}") from None
        except self._redis.RedisError as err:
            if require:
                raise KVTierError(
                    f"KV tier at {self.url} is unreachable ({type(err).__name__}: {err}): start the Redis server "
                    "or fix the URL"
                ) from None
            self._failed(err)
            return False
        self._recovered()
        return True

    @property
    def available(self) -> bool:
        """False while the server is being skipped after a failure."""
        return not self._down

    def bind(self, fingerprint: str) -> None:
        self._namespace = f"{self.prefix}:kv:{hashlib.sha256(fingerprint.encode()).hexdigest()[:16]}:"

    def redis_key(self, key: str) -> str:
        """The Redis key of entry `key` (ValueError unless `key` looks like an `entry_key`)."""
        if not is_entry_key(key):
            raise ValueError(f"not a KV store key: {key!r} (expected 64 lowercase hex digits)")
        if not self._namespace:
            raise RuntimeError("the Redis tier is not bound to a model: bind it through its TieredStore first")
        return self._namespace + key

    def get(self, key: str) -> tuple[ChunkKV, str] | None:
        name = self.redis_key(key)
        blob = self._call(lambda c: c.getex(name, ex=self.ttl_s) if self.ttl_s else c.get(name))
        return decode_read(blob, key, self._stats, lambda: self._call(lambda c: c.delete(name)), f"{key} in {self.url}")

    def put(self, key: str, entry: ChunkKV, fingerprint: str) -> None:
        """One atomic SET of the whole value: concurrent writers of a key leave one of their
        (identical-content) values, never a mix."""
        name = self.redis_key(key)
        blob = encode(entry, fingerprint)
        self._call(lambda c: c.set(name, blob, ex=self.ttl_s))

    def contains(self, key: str) -> bool:
        name = self.redis_key(key)
        return bool(self._call(lambda c: c.exists(name)))

    def delete(self, key: str) -> bool:
        name = self.redis_key(key)
        return bool(self._call(lambda c: c.delete(name)))

    def keys(self) -> Iterator[str]:
        names = self._call(lambda c: list(c.scan_iter(match=self._namespace + "*", count=1000))) or []
        prefix = len(self._namespace)
        return (key for key in (n.decode()[prefix:] for n in names) if is_entry_key(key))

    def clear(self) -> None:
        """Delete this model's entries (other models' and other data in the database stay)."""
        names = self._call(lambda c: list(c.scan_iter(match=self._namespace + "*", count=1000))) or []
        for start in range(0, len(names), 1000):
            self._call(lambda c, batch=names[start : start + 1000]: c.delete(*batch))

    def counters(self) -> BackendStats:
        return replace(self._stats)

    def stats(self) -> BackendStats:
        """Counters, plus this model's entries and their bytes (one SCAN and STRLENs: O(entries))."""
        names = self._call(lambda c: list(c.scan_iter(match=self._namespace + "*", count=1000))) or []
        sizes = self._call(lambda c: _pipelined_strlen(c, names)) or []
        return replace(self._stats, bytes=sum(sizes), entries=len(names))

    def _call(self, op: Any) -> Any:
        """`op(client)`, or None when the server is down (skipped, or failing now: counted, logged)."""
        if self._down and time.monotonic() < self._down_until:
            self._stats.errors += 1
            return None
        try:
            result = op(self._client)
        except self._redis.AuthenticationError as err:
            raise self._auth_error(err) from None
        except self._redis.RedisError as err:
            if isinstance(err, self._redis.ResponseError) and _is_auth_refusal(err):
                raise self._auth_error(err) from None
            self._stats.errors += 1
            self._failed(err)
            return None
        self._recovered()
        return result

    def _failed(self, err: Exception) -> None:
        with self._lock:
            self._down_until = time.monotonic() + self.retry_after_s
            if not self._down:
                log.warning(
                    "KV tier at %s failed (%s: %s); computing what it would have served, retrying in %.0f s",
                    self.url,
                    type(err).__name__,
                    err,
                    self.retry_after_s,
                )
            self._down = True

    def _recovered(self) -> None:
        if self._down:
            with self._lock:
                if self._down:
                    log.warning("KV tier at %s answers again", self.url)
                self._down = False

    def _auth_error(self, err: Exception) -> KVTierError:
        return KVTierError(
            f"KV tier at {self.url} refused the credentials ({err}): put the right user and password in the URL, "
            "redis://user:password@host:port/db"
        )


def _is_auth_refusal(err: Exception) -> bool:
    text = str(err)
    return text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")) or "Authentication required" in text


def _pipelined_strlen(client: Any, names: list[bytes]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.strlen(name)
    return pipe.execute()
