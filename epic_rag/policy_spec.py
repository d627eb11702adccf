"""The grammar of policy specs ('attnlink:16', 'guided:16+ape:0.9:1', ...), without torch.

One parser for every place a spec is read: `parse_policy` builds the policy from it, and
the command line checks a spec with it before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_POLICY = "attnlink:16"
DEFAULT_RESCALE = (0.9, 1.0)  # (T, S) for a bare "+ape": the dev sweep (benchmarks/RESULTS.md)
DEFAULT_SHIFT = 1.0  # weight of a bare "+shift": the whole mean offset
CANDIDATES = (  # what `calibrate` compares by default
    "attnlink:16",
    "attnlink:16+shift:0.25",
    "guided:16",
    "guided:16:4:all",
    "reuse",
    "cacheblend:0.15",
    "budget:2.5x+shift:0.25",
)

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
    "budget": "budget",
}
_MAX_ARGS = {"full": 0, "reuse": 0, "prefix": 0, "attnlink": 1, "cacheblend": 2, "guided": 3, "budget": 1}
_USAGE = (
    "use one of: full, reuse, prefix, attnlink:K (e.g. attnlink:16), cacheblend:R (e.g. cacheblend:0.15), "
    "guided:K (e.g. guided:16), budget:SECONDS or budget:Nx (a TTFT target, e.g. budget:2.5 or budget:3x), "
    "each optionally +shift[:w] and +ape:T:S (e.g. attnlink:16+shift+ape:0.9:0.9)"
)


@dataclass(frozen=True)
class PolicySpec:
    """A parsed spec: the method, its arguments with defaults filled in, and APE's (T, S) if any."""

    name: str  # full | reuse | prefix | attnlink | cacheblend | guided | budget
    args: tuple = ()  # attnlink (k,); cacheblend (ratio, check_layer); guided (k, sinks, layers);
    # budget (seconds, None) or (None, multiple of the reuse floor)
    rescale: tuple[float, float] | None = None
    shift: float | None = None  # the offset correction's weight


def parse_spec(spec: str) -> PolicySpec:
    """'full' | 'reuse' | 'prefix' | 'attnlink[:k]' | 'cacheblend[:ratio[:check_layer]]' |
    'guided[:k[:sinks[:layer+layer...|all]]]' | 'budget:seconds' | 'budget:Nx', optionally followed
    by '+shift[:w]' (offset correction) and '+ape[:T[:S]]' (attention rescaling)."""
    text = str(spec).strip().lower()
    pieces = text.split("+")
    base = [pieces[0]]
    modifiers: dict[str, list[str]] = {}
    for piece in pieces[1:]:
        name, _, rest = piece.partition(":")
        if name in ("ape", "shift"):
            if name in modifiers:
                raise ValueError(f"bad policy {spec!r}: +{name} is given twice")
            modifiers[name] = rest.split(":") if rest else []
        elif modifiers or piece[:1] not in "-0123456789":  # '+' only joins guided's layer list
            raise ValueError(f"bad policy {spec!r}: after the method come +shift[:w] and +ape[:T[:S]] only")
        else:
            base.append(piece)
    try:
        rescale = _rescale(modifiers["ape"]) if "ape" in modifiers else None
        shift = _shift(modifiers["shift"]) if "shift" in modifiers else None
    except ValueError as err:
        raise ValueError(f"bad policy {spec!r}: {err}") from None
    name, *raw = [p.strip() for p in "+".join(base).split(":")]
    kind = _ALIASES.get(name)
    if kind is None or len(raw) > _MAX_ARGS[kind]:
        raise ValueError(f"unknown policy {spec!r}; {_USAGE}")
    try:
        args = _arguments(kind, raw)
    except ValueError as err:
        raise ValueError(f"bad policy {spec!r}: {err}") from None
    return PolicySpec(kind, args, rescale, shift)


def _rescale(raw: list[str]) -> tuple[float, float]:
    values = tuple(float(v) for v in raw)
    if len(values) > 2:
        raise ValueError("+ape takes at most T and S")
    rescale = (values + DEFAULT_RESCALE[len(values) :])[:2]
    if not (rescale[0] > 0 and rescale[1] > 0):
        raise ValueError("attention rescaling needs T > 0 and S > 0")
    return rescale


def _shift(raw: list[str]) -> float:
    if len(raw) > 1:
        raise ValueError("+shift takes at most a weight")
    weight = float(raw[0]) if raw else DEFAULT_SHIFT
    if not weight >= 0:
        raise ValueError(f"the offset correction needs a weight >= 0, got {weight:g}")
    return weight


def _arguments(kind: str, raw: list[str]) -> tuple:
    if kind == "attnlink":
        k = int(raw[0]) if raw else 16
        if k < 0:
            raise ValueError(f"AttnLink needs k >= 0, got {k}")
        return (k,)
    if kind == "cacheblend":
        return (float(raw[0]) if raw else 0.15, int(raw[1]) if len(raw) > 1 else 1)
    if kind == "guided":
        layers = _layers(raw[2]) if len(raw) > 2 else (-1,)
        return (int(raw[0]) if raw else 16, int(raw[1]) if len(raw) > 1 else 4, layers)
    if kind == "budget":
        if not raw:
            raise ValueError("budget needs a TTFT target: seconds (budget:2.5) or a multiple of reuse's (budget:3x)")
        multiple = raw[0].endswith("x")
        value = float(raw[0].removesuffix("x"))
        if not value > 0 or (multiple and value < 1):
            raise ValueError(f"a TTFT target must be > 0 seconds or >= 1x, got {raw[0]}")
        return (None, value) if multiple else (value, None)
    return ()


def _layers(text: str) -> tuple[int, ...] | str:
    """Scoring layers: 'all', or indices joined by '+' (negative counts from the last)."""
    return "all" if text == "all" else tuple(int(i) for i in text.split("+"))
