"""Needle in a haystack: one sentence hidden at depths 0-100% of essay contexts of growing length.

Runs through the accuracy harness (same methods, metrics, resumable folder) and adds
a grid of F1 per method by context length and depth (DIR/needle.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .accuracy import add_common_arguments, apply_model_defaults, context_budget, format_table, load_engine, run_records
from .data import DATA_ENV, essay_folder
from .records import NEEDLE, NEEDLE_QUESTION, fit_chunks, needle_records

DEFAULT_METHODS = ("full", "reuse", "cacheblend:0.15", "attnlink:16", "guided:16")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def needle_grid(out: Path, methods: list[str]) -> str:
    """Markdown: F1 (%) of each method per (context tokens, depth), from the saved records."""
    cells: dict[tuple[str, int, float], float] = {}
    for path in (out / "records").glob("*.json"):
        saved = json.loads(path.read_text())
        meta = saved.get("meta", {})
        for m in methods:
            if m in saved["methods"] and "depth" in meta:
                cells[(m, meta["context_tokens"], meta["depth"])] = saved["methods"][m]["f1"]
    lengths = sorted({k[1] for k in cells})
    depths = sorted({k[2] for k in cells})
    lines = []
    for m in methods:
        lines.append(f"\n{m}: F1 % by context tokens (rows) and needle depth (columns)\n")
        lines.append("| tokens | " + " | ".join(f"{d:.0%}" for d in depths) + " |")
        lines.append("|---:|" + "---:|" * len(depths))
        for n in lengths:
            row = [cells.get((m, n, d)) for d in depths]
            lines.append(f"| {n} | " + " | ".join("" if v is None else f"{v * 100:.0f}" for v in row) + " |")
    return "\n".join(lines) + "\n"


def fitting_lengths(engine, lengths: list[int], budget: int, chunk_tokens: int) -> list[int]:
    """`lengths` with any longer than `budget` chunk tokens can hold (with the needle and
    the chunk separators) lowered to the longest haystack that fits."""
    separators = engine.tokenize(engine.chunk_separator).numel() + 1  # +1: a piece boundary may split a word
    longest = budget - engine.tokenize(" " + NEEDLE + " ").numel() - separators * -(-budget // chunk_tokens)
    if longest < min(lengths):
        raise ValueError(f"no haystack fits: the model takes {budget} context tokens here; lower --lengths")
    fitted = sorted({min(n, longest) for n in lengths})
    if fitted[-1] < max(lengths):
        print(f"context lengths above {longest} tokens do not fit the model with the prompt; using {longest}")
    return fitted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--essays", type=Path, default=None, help=f"folder of .txt essays (default: ${DATA_ENV}/haystack)"
    )
    parser.add_argument(
        "--lengths", type=_ints, default=[1024, 2048, 4096, 8192], help="context tokens, e.g. 1024,4096"
    )
    parser.add_argument("--depths", type=_ints, default=[0, 25, 50, 75, 100], help="needle depths in percent")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("bench-needle"), help="output folder (resumable)")
    add_common_arguments(parser, DEFAULT_METHODS)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    apply_model_defaults(args)
    essays = essay_folder(args.essays)  # before the model loads: a missing folder fails at once
    engine = load_engine(args)
    budget = context_budget(engine, NEEDLE_QUESTION, args.max_new_tokens, args.max_context_tokens)
    lengths = fitting_lengths(engine, args.lengths, budget, args.chunk_tokens)
    records = needle_records(engine, essays, lengths, [d / 100 for d in args.depths], args.chunk_tokens)
    for r in records:  # the harness would drop trailing chunks that overflow, and the needle with them
        if fit_chunks(engine, r.chunks, budget) != r.chunks:
            raise ValueError(f"{r.id}: its chunks overflow the {budget} tokens the model leaves; lower --lengths")
    args.chunking = f"fixed:{args.chunk_tokens}"
    result = run_records(args, engine, records, f"needle:{essays.name}")
    grid = needle_grid(Path(args.out), list(dict.fromkeys(args.methods)))
    (Path(args.out) / "needle.md").write_text(grid)
    print(format_table(result) + grid)
    return 0
