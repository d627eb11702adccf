"""The grammar of policy specs ('attnlink:16', 'guided:16+ape:0.9:1', ...), without torch.

One parser for every place a spec is read: `parse_policy` builds the policy from it, and
the command line checks a spec with it before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_POLICY = "attnlink:16"
DEFAULT_RESCALE = (0.9, 1.0)  # (T, S) for a bare "+ape": the dev sweep (benchmarks/RESULTS.md)
CANDIDATES = ("attnlink:16", "guided:16", "reuse", "cacheblend:0.15")  # what `calibrate` compares by default

_ALIASES = {
    "full": "full",
    "fullrecompute": "full",
    "full_recompute": "full",
    "reuse": "reuse",
    "fullreuse": "reuse",
    "full_reuse": "reuse",
    "naive": "reuse",
    "prefix": "prefix",
    "prefixonly": "prefix",
    "prefix_only": "prefix",
    "attnlink": "attnlink",
    "legolink": "attnlink",
    "cacheblend": "cacheblend",
    "guided": "guided",
}
_MAX_ARGS = {"full": 0, "reuse": 0, "prefix": 0, "attnlink": 1, "cacheblend": 2, "guided": 3}
_USAGE = (
    "use one of: full, reuse, prefix, attnlink:K (e.g. attnlink:16), cacheblend:R (e.g. cacheblend:0.15), "
    "guided:K (e.g. guided:16), each optionally +ape:T:S (e.g. attnlink:16+ape:0.9:0.9)"
)


@dataclass(frozen=True)
class PolicySpec:
    """A parsed spec: the method, its arguments with defaults filled in, and APE's (T, S) if any."""

    name: str  # full | reuse | prefix | attnlink | cacheblend | guided
    args: tuple = ()  # attnlink (k,); cacheblend (ratio, check_layer); guided (k, sinks, layers)
    rescale: tuple[float, float] | None = None


def parse_spec(spec: str) -> PolicySpec:
    """'full' | 'reuse' | 'prefix' | 'attnlink[:k]' | 'cacheblend[:ratio[:check_layer]]' |
    'guided[:k[:sinks[:layer+layer...]]]', optionally followed by '+ape[:T[:S]]'."""
    text = str(spec).strip().lower()
    base, marker, ape = text.partition("+ape")
    rescale = None
    if marker:
        if ape and not ape.startswith(":"):
            raise ValueError(f"bad policy {spec!r}: write the rescaling as +ape, +ape:T or +ape:T:S")
        try:
            values = tuple(float(v) for v in ape.split(":")[1:])
        except ValueError as err:
            raise ValueError(f"bad policy {spec!r}: {err}") from None
        if len(values) > 2:
            raise ValueError(f"bad policy {spec!r}: +ape takes at most T and S")
        rescale = (values + DEFAULT_RESCALE[len(values) :])[:2]
        if not (rescale[0] > 0 and rescale[1] > 0):
            raise ValueError(f"bad policy {spec!r}: attention rescaling needs T > 0 and S > 0")
    name, *raw = [p.strip() for p in base.split(":")]
    kind = _ALIASES.get(name)
    if kind is None or len(raw) > _MAX_ARGS[kind]:
        raise ValueError(f"unknown policy {spec!r}; {_USAGE}")
    try:
        args = _arguments(kind, raw)
    except ValueError as err:
        raise ValueError(f"bad policy {spec!r}: {err}") from None
    return PolicySpec(kind, args, rescale)


def _arguments(kind: str, raw: list[str]) -> tuple:
    if kind == "attnlink":
        k = int(raw[0]) if raw else 16
        if k < 0:
            raise ValueError(f"AttnLink needs k >= 0, got {k}")
        return (k,)
    if kind == "cacheblend":
        return (float(raw[0]) if raw else 0.15, int(raw[1]) if len(raw) > 1 else 1)
    if kind == "guided":
        layers = tuple(int(i) for i in raw[2].split("+")) if len(raw) > 2 else (-1,)
        return (int(raw[0]) if raw else 16, int(raw[1]) if len(raw) > 1 else 4, layers)
    return ()
