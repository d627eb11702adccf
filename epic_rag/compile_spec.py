"""How an index compiles its chunks' KV, as users write it (torch-free, for CLI parsing).

alone        each chunk from position 0 with nothing before it (the EPIC default)
neighbour    after the chunk before it in its document, computed in full
similar:N    after the prompt head and the N chunks of the index most similar to it
             (by the index's embeddings, nearest adjacent), linked from their own KV
"""

from __future__ import annotations

from typing import NamedTuple

COMPILE_KINDS = ("alone", "neighbour", "similar")
DEFAULT_SIMILAR = 5


class CompileMode(NamedTuple):
    kind: str = "alone"
    n: int = 0  # similar chunks linked before each chunk (similar only)

    @classmethod
    def parse(cls, spec: str) -> CompileMode:
        """'alone', 'neighbour', 'similar' (N = 5) or 'similar:N' -> CompileMode; a clear error otherwise."""
        kind, _, arg = spec.strip().partition(":")
        if kind not in COMPILE_KINDS or (arg and kind != "similar"):
            raise ValueError(f"unknown compile mode {spec!r}; choose alone, neighbour or similar:N (e.g. similar:5)")
        if kind != "similar":
            return cls(kind)
        try:
            n = int(arg) if arg else DEFAULT_SIMILAR
        except ValueError:
            raise ValueError(f"compile mode {spec!r}: N must be a whole number of chunks, e.g. similar:5") from None
        if n < 1:
            raise ValueError(f"compile mode {spec!r}: N must be at least 1")
        return cls(kind, n)

    def __str__(self) -> str:
        return f"similar:{self.n}" if self.kind == "similar" else self.kind


ALONE = CompileMode()
