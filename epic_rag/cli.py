"""The `epic-rag` command line.

The engine's own command lives here (`info`). The RAG application (`index`, `ask`,
`chat`, `calibrate`), the server (`serve`) and the benchmarks (`bench ...`) add theirs
through the ``epic_rag.cli`` entry-point group: each entry is ``register(subparsers)``.

Subcommands are `LazyParser`s: their arguments are added only when that subcommand is
named, so `epic-rag --help` and argument errors answer before torch or LlamaIndex load.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from importlib.metadata import entry_points

from .offline import DEFAULT_MODEL, OFFLINE_MODELS

Configure = Callable[[argparse.ArgumentParser], None]


class LazyParser(argparse.ArgumentParser):
    """A subcommand parser whose arguments `configure(parser)` adds on first use."""

    def __init__(self, *args, configure: Configure | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._configure = configure

    def parse_known_args(self, args=None, namespace=None):
        if self._configure is not None:
            configure, self._configure = self._configure, None
            configure(self)
        return super().parse_known_args(args, namespace)


class MissingExtraError(RuntimeError):
    """A command needs something that is not installed; the message names the pip command."""


def require_extra(command: str, extra: str, *modules: str) -> None:
    """Raise `MissingExtraError` naming the pip command when one of `modules` cannot be imported."""
    from importlib.util import find_spec

    for module in modules:
        if find_spec(module) is None:
            raise MissingExtraError(
                f"`epic-rag {command}` needs the {extra} extra ({module} is not installed): "
                f"pip install 'epic-rag[{extra}]'"
            )


def argparse_type(parse: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse type from a parser that raises ValueError: its message becomes the usage error."""

    def check(text: str) -> str:
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    check.__name__ = getattr(parse, "__name__", "value")
    return check


def _info(args: argparse.Namespace) -> int:
    print("built-in offline models:")
    for name, entry in OFFLINE_MODELS.items():
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"  {name}{mark}: {entry.description}; default policy {entry.policy}")
    if args.model:
        from .engine import EpicEngine

        engine = EpicEngine.from_pretrained(args.model)
        cfg = engine.model.config
        print(f"model: {args.model}")
        print(
            f"  architecture: {cfg.model_type}, {engine.n_layers} layers, "
            f"{engine.kv_heads} KV heads, head_dim {engine.head_dim}"
        )
        print(f"  context window: {engine.max_context} tokens; rope type: {engine.rotary.rope_type}")
        print(f"  chat template: {engine.use_chat_template}; fingerprint: {engine.fingerprint[:16]}")
        print(f"  KV bytes per token: {engine.kv_bytes_per_token}; default policy: {engine.default_policy.spec}")
    if args.store:
        from .store import KVStore

        s = KVStore(args.store).stats()
        print(f"store: {args.store}: {s.disk_entries} entries, {s.disk_bytes / 2**20:.1f} MiB")
    plugins = sorted(e.name for e in entry_points(group="epic_rag.cli"))
    print(f"command groups installed: {', '.join(plugins) or 'none (pip install epic-rag[llama-index])'}")
    return 0


def _configure_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help=f"model to describe (e.g. {DEFAULT_MODEL})")
    p.add_argument("--store", default=None, help="KV store folder to summarise")
    p.set_defaults(func=_info)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epic-rag", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=LazyParser)
    sub.add_parser("info", help="built-in models, model and KV store facts", configure=_configure_info)
    groups = entry_points(group="epic_rag.cli")
    for entry in groups:
        entry.load()(sub)
    if "bench" not in groups.names:
        sub.add_parser("bench", help="benchmarks (not installed: see `epic-rag bench`)", configure=_configure_no_bench)
    return parser


def _configure_no_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_no_bench)


def _no_bench(args: argparse.Namespace) -> int:
    raise MissingExtraError(
        "the benchmark harnesses ship beside the library, not in it: from a clone of the repository, "
        "pip install -e ./benchmarks"
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError, MissingExtraError) as err:
        print(f"epic-rag: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every write is atomic (KV entries, index storage, manifest)
        print("\nepic-rag: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
