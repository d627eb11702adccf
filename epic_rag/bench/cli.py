"""`epic-rag bench ...` subcommands."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks: TTFT per method, accuracy on LongBench-format data")
    kinds = bench.add_subparsers(dest="bench_command", required=True)
    from .ttft import add_arguments as ttft_args

    ttft = kinds.add_parser("ttft", help="TTFT per method for 2/4/8 chunks (prints a table, writes JSON)")
    ttft_args(ttft)
