"""The `epic-rag` command line.

The engine's own commands live here (`info`, `bench ...`). Framework integrations
add theirs (`index`, `ask`, `chat`) through the ``epic_rag.cli`` entry-point group:
each entry is a function ``register(subparsers)`` that adds subcommands whose
parsers set ``func``. The engine never imports an integration.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

from .offline import DEFAULT_MODEL, OFFLINE_MODELS


def _info(args: argparse.Namespace) -> int:
    from .engine import EpicEngine
    from .store import KVStore

    print("built-in offline models:")
    for name, entry in OFFLINE_MODELS.items():
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(f"  {name}{mark}: {entry.description}; default policy {entry.policy}")
    if args.model:
        engine = EpicEngine.from_pretrained(args.model, store_dir=args.store)
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
        s = KVStore(args.store).stats()
        print(f"store: {args.store}: {s.disk_entries} entries, {s.disk_bytes / 2**20:.1f} MiB")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epic-rag", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="model and KV store facts")
    info.add_argument("--model", default=None, help=f"model to describe (e.g. {DEFAULT_MODEL})")
    info.add_argument("--store", default=None, help="KV store folder to summarise")
    info.set_defaults(func=_info)
    from .bench.cli import register as register_bench

    register_bench(sub)
    for entry in entry_points(group="epic_rag.cli"):
        entry.load()(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as err:
        print(f"epic-rag: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every write is atomic (KV entries, index storage, manifest)
        print("\nepic-rag: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
