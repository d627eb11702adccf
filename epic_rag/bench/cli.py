"""`epic-rag bench ...` subcommands; integrations add theirs through the ``epic_rag.bench`` entry points."""

from __future__ import annotations

from importlib.metadata import entry_points


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: TTFT per method, accuracy on LongBench-format data")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    from .accuracy import add_arguments as accuracy_args
    from .needle import add_arguments as needle_args
    from .qa import add_arguments as qa_args
    from .scaling import add_arguments as scaling_args
    from .ttft import add_arguments as ttft_args

    ttft = kinds.add_parser("ttft", help="TTFT per method for 2/4/8 chunks (prints a table, writes JSON)")
    ttft_args(ttft)
    accuracy = kinds.add_parser("accuracy", help="F1, TTFT and agreement with full recompute per method (resumable)")
    accuracy_args(accuracy)
    qa = kinds.add_parser("qa", help="questions over a documents folder: retrieval, then every method (resumable)")
    qa_args(qa)
    needle = kinds.add_parser("needle", help="needle in a haystack of essays: depth x context length per method")
    needle_args(needle)
    scaling = kinds.add_parser("scaling", help="TTFT and peak memory as the context grows; indexing cost")
    scaling_args(scaling)
    for entry in entry_points(group="epic_rag.bench"):
        entry.load()(kinds)
