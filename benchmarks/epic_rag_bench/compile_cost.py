"""What a compile mode costs at index time: seconds to compile the same chunks' KV, per mode.

The chunks are the first --chunks KVSplit chunks of a documents folder (as `bench qa` and
`epic-rag index` cut them), embedded with MiniLM; each mode compiles them into a fresh
memory store, so every entry it needs is computed and counted (a similar compile also
compiles the plain entries it links, as an index build does). Query time costs the same
under every mode: only this differs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from epic_rag.app.cli import compile_arg
from tqdm.auto import tqdm

from epic_rag.chunking import load_sentence_encoder
from epic_rag.compile_spec import CompileMode
from epic_rag.engine import EpicEngine
from epic_rag.offline import DEFAULT_MODEL
from epic_rag.store import KVStore

from .accuracy import machine
from .devices import add_device_arguments, resolve_device_arguments
from .output import write_result
from .qa import corpus_chunks
from .records import ChunkIndex


def measure(engine: EpicEngine, index: ChunkIndex, modes: list[str]) -> list[dict]:
    """Per mode: seconds to compile every chunk of `index` into an empty store, and entries made."""
    rows = []
    for spec in tqdm(modes, desc="compile modes", unit="mode"):
        fresh = EpicEngine(engine.model, engine.tokenizer, KVStore())  # the same weights, an empty store
        contexts = index.contexts(index.texts, CompileMode.parse(spec))
        start = time.perf_counter()
        fresh.add_chunks(index.texts, progress=False, **contexts)
        seconds = time.perf_counter() - start
        linked = {t for texts in contexts.get("link_after", []) for t in texts}  # chunks some entry links
        row = {"compile": spec, "seconds": seconds, "entries": len(list(fresh.store.keys()))}
        rows.append({**row, "chunks_linked": len(linked)})
    alone = next((r["seconds"] for r in rows if r["compile"] == "alone"), None)
    for row in rows:
        row["vs_alone"] = row["seconds"] / alone if alone else None
    return rows


def format_table(result: dict) -> str:
    head = (
        f"model {result['model']} ({result['machine']}), {result['chunks']} chunks of {result['corpus']}, "
        f"{result['tokens']} tokens\n\n| compile | seconds | s per chunk | entries stored | x alone |\n"
        "|---|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['compile']} | {r['seconds']:.1f} | {r['seconds'] / result['chunks']:.2f} | {r['entries']} | "
        f"{_times(r['vs_alone'])} |"
        for r in result["rows"]
    ]
    return head + "\n".join(rows) + "\n"


def _times(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", type=Path, required=True, help="folder of .txt/.md documents")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, folder or .gguf")
    parser.add_argument(
        "--modes",
        type=lambda s: [compile_arg(m) for m in s.split(",")],
        default=["alone", "similar:2", "similar:5", "similar:10"],
        help="compile modes, comma-separated (default alone,similar:2,similar:5,similar:10)",
    )
    parser.add_argument("--chunks", type=int, default=48, help="the first N chunks of the corpus (default 48)")
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench-compile-cost"), help="folder for results.json")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    resolve_device_arguments(args)
    engine = EpicEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    full = corpus_chunks(engine, args.corpus, 256, 384, 48)
    texts = full.texts[: args.chunks]
    index = ChunkIndex(texts, full.previous[: args.chunks], torch.as_tensor(load_sentence_encoder()(texts)))
    rows = measure(engine, index, args.modes)
    result = {
        "model": args.model,
        "machine": machine(),
        "corpus": args.corpus.name,
        "chunks": len(texts),
        "tokens": sum(engine.chunk_token_ids(t).numel() for t in texts),
        "rows": rows,
    }
    write_result(args.out, result, format_table(result))
    return 0
