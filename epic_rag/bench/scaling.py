"""TTFT and peak memory per method as the retrieved context grows; the cost of indexing.

The parent compiles ~512-token essay chunks once into a disk KV store (indexing
tokens/s) and measures KV bytes per token for each storage dtype. Every cell
(context size, method, KV source) then runs in a fresh subprocess whose peak RSS
(Linux VmHWM, reset after the model is loaded so loading does not mask it) is its
own: KV "memory" is loaded into the
memory tier by a warm-up prefill first, KV "disk" clears the memory tier before every
timed prefill so each run reads the safetensors files.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..engine import EpicEngine
from ..store import STORAGE_DTYPES, KVStore
from .accuracy import machine
from .data import essay_chunks
from .records import fit_chunks
from .ttft import QUESTION

METHODS = ("full", "cacheblend:0.15", "attnlink:16", "reuse")
SOURCES = ("memory", "disk")
NO_STORE = ("full",)  # methods that read no chunk KV: measured once, as source "none"


def _status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as fh:
        line = next(x for x in fh if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def run_cell(cell: dict) -> dict:
    """One (size, method, source) cell, in this process: median TTFT and peak RSS."""
    torch.set_num_threads(cell["threads"])
    engine = EpicEngine.from_pretrained(cell["model"], store_dir=cell["store"])
    ids = engine.add_chunks(cell["chunks"], progress=False)  # all hits: they were compiled by the parent
    engine.store.clear_memory()
    layout = engine.layout(QUESTION, ids)
    gc.collect()
    _reset_peak_rss()
    baseline = _status_mib("VmRSS")
    engine.prefill(layout, cell["method"])  # warm-up; fills the memory tier for source "memory"
    times = []
    for _ in range(cell["repeats"]):
        if cell["source"] == "disk":
            engine.store.clear_memory()
        times.append(engine.prefill(layout, cell["method"]).stats.ttft_s)
    peak = _status_mib("VmHWM")
    return {
        "tokens": layout.length,
        "chunks": len(ids),
        "method": cell["method"],
        "kv_from": cell["source"],
        "ttft_s": statistics.median(times),
        "peak_rss_mib": peak,
        "baseline_rss_mib": baseline,
        "peak_over_baseline_mib": peak - baseline,
    }


def _spawn(cell: dict) -> dict:
    """Run one cell in a fresh interpreter (cell JSON on stdin) and parse its JSON line."""
    proc = subprocess.run(
        [sys.executable, "-m", "epic_rag.bench.scaling"],
        input=json.dumps(cell),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"scaling cell {cell['method']}/{cell['source']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def storage_costs(engine: EpicEngine, chunk: str) -> list[dict]:
    """Bytes of KV per token in memory and on disk (safetensors file) for each storage dtype."""
    token_ids = engine.chunk_token_ids(chunk)
    entry = engine.encode(token_ids)
    rows = []
    for name, dtype in STORAGE_DTYPES.items():
        with tempfile.TemporaryDirectory() as tmp:
            store = KVStore(tmp, dtype=dtype, fingerprint=engine.fingerprint)
            store.put(entry)
            disk = store.stats().disk_bytes
            memory = entry.to(dtype).nbytes
        rows.append(
            {"dtype": name, "memory_bytes_per_token": memory / len(entry), "disk_bytes_per_token": disk / len(entry)}
        )
    return rows


def _chunks_that_fit(engine: EpicEngine, chunks: list[str]) -> int:
    """How many leading chunks fit in the model's context with the question and one new token."""
    return len(fit_chunks(engine, chunks, engine.max_context - engine.layout(QUESTION, []).length - 1))


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_dir = tempfile.mkdtemp(prefix="epic-scaling-")
    engine = EpicEngine.from_pretrained(args.model, store_dir=store_dir)
    limit = min(args.max_tokens, engine.max_context)
    sizes = [s for s in args.sizes if s <= limit]
    chunks = essay_chunks(engine, max(sizes) // args.chunk_tokens, args.chunk_tokens, args.essays)
    chunks = chunks[: _chunks_that_fit(engine, chunks)]  # the largest size is the model's limit
    tokens = sum(engine.chunk_token_ids(c).numel() for c in chunks)
    start = time.perf_counter()
    engine.add_chunks(chunks, progress=True)
    index_s = time.perf_counter() - start
    cells = [
        (size, method, source)
        for size in sizes
        for method in args.methods
        for source in (("none",) if method in NO_STORE else args.sources)
    ]
    rows = []
    for size, method, source in tqdm(cells, desc="scaling", unit="cell"):
        cell = {
            "model": args.model,
            "store": store_dir,
            "chunks": chunks[: max(1, size // args.chunk_tokens)],
            "method": method,
            "source": source,
            "repeats": args.repeats,
            "threads": torch.get_num_threads(),
        }
        rows.append(_spawn(cell))
    return {
        "model": args.model,
        "dtype": "fp32",
        "machine": machine(),
        "repeats": args.repeats,
        "chunk_tokens": args.chunk_tokens,
        "indexing": {"tokens": tokens, "seconds": index_s, "tokens_per_s": tokens / index_s},
        "kv_bytes_per_token": storage_costs(engine, chunks[0]),
        "rows": rows,
    }


def format_table(result: dict) -> str:
    ix = result["indexing"]
    lines = [
        f"model {result['model']} ({result['dtype']}, {result['machine']}), median of {result['repeats']} per cell\n",
        f"indexing: {ix['tokens']} tokens in {ix['seconds']:.1f} s = {ix['tokens_per_s']:.0f} tokens/s\n",
        "| storage dtype | KV bytes/token in memory | on disk (safetensors) |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| {r['dtype']} | {r['memory_bytes_per_token']:.0f} | {r['disk_bytes_per_token']:.0f} |"
        for r in result["kv_bytes_per_token"]
    ]
    lines += [
        "",
        "| tokens | method | KV from | TTFT s | peak RSS MiB | peak over model-loaded RSS MiB |",
        "|---:|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['tokens']} | {r['method']} | {r['kv_from']} | {r['ttft_s']:.3f} | {r['peak_rss_mib']:.0f} | "
        f"{r['peak_over_baseline_mib']:.0f} |"
        for r in sorted(result["rows"], key=lambda r: (r["tokens"], r["method"], r["kv_from"]))
    ]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="built-in name, folder or .gguf")
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--sources", type=lambda s: s.split(","), default=list(SOURCES), help="memory,disk")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192])
    parser.add_argument("--max-tokens", type=int, default=8192, help="largest context measured (CPU time cap)")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--essays", type=Path, default=None, help="folder of .txt essays (default: shared haystack)")
    parser.add_argument("--out", type=Path, default=Path("bench-scaling"))
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .plots import plot_scaling

    unknown = set(args.sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown KV sources {sorted(unknown)}; use memory and/or disk")
    result = run(args)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2))
    (args.out / "scaling.md").write_text(format_table(result))
    plot_scaling(result["rows"], args.out / "scaling.png", title=f"{result['model']}, {result['machine']}")
    print(format_table(result))
    return 0


if __name__ == "__main__":  # one cell, its description as JSON on stdin (used by `_spawn`)
    print(json.dumps(run_cell(json.loads(sys.stdin.read()))))
