"""`epic-rag bench ...`: every benchmark harness, registered into the `epic-rag` command.

This package ships beside the library, not in it (`pip install -e ./benchmarks` from a
clone): a user of the engine gets no benchmark code, data readers or plotting.
"""

from __future__ import annotations

import argparse
from importlib import import_module

# subcommand -> (module holding add_arguments, help)
HARNESSES = {
    "ttft": ("ttft", "TTFT per method for 2/4/8 chunks (prints a table, writes JSON)"),
    "accuracy": ("accuracy", "F1, TTFT and agreement with full recompute per method (resumable)"),
    "qa": ("qa", "questions over a documents folder: retrieval, then every method (resumable)"),
    "needle": ("needle", "needle in a haystack of essays: depth x context length per method"),
    "scaling": ("scaling", "TTFT and peak memory as the context grows; indexing cost"),
    "serve": ("serve", "concurrent clients through the HTTP server, per policy"),
    "decode-batch": ("decode_batch", "one batched decode step's time per batch size (what --max-batch trades)"),
    "app-quality": ("app_quality", "end-to-end quality of ask and chat on question files, per policy"),
    "compile-cost": ("compile_cost", "index-time cost of each compile mode (alone, neighbour, similar:N)"),
    "dtypes": ("dtypes", "TTFT and first-token KL against float32 of each compute dtype, per method"),
    "reindex": ("reindex", "an index update after one document changed, was added or removed, against a full build"),
    "frontier": ("frontier", "quality-vs-TTFT frontier of policy/compile pairs from saved accuracy/qa runs"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` and its harnesses; a harness module is imported only when its command is named."""
    subparsers.add_parser(
        "bench", help="benchmarks: TTFT, accuracy, QA, needle, scaling, serving", configure=_configure_bench
    )


def _configure_bench(bench: argparse.ArgumentParser) -> None:
    kinds = bench.add_subparsers(dest="bench_command", required=True, parser_class=type(bench))
    for name, (module, help_text) in HARNESSES.items():
        kinds.add_parser(name, help=help_text, configure=_harness(module))


def _harness(module: str):
    def configure(parser: argparse.ArgumentParser) -> None:
        import_module(f"{__package__}.{module}").add_arguments(parser)

    return configure
