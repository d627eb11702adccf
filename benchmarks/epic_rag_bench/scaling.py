"""TTFT and peak memory per method as the retrieved context grows; the cost of indexing.

The parent compiles ~512-token essay chunks once into a disk KV store (and a Redis
server with `--kv-url`), measures indexing tokens/s, KV bytes per token and the
first-token KL each storage dtype costs, and the time to fetch one chunk from each
tier. Every cell (context size, method, KV source) then runs in a fresh subprocess
whose peak RSS (Linux VmHWM, reset after the model is loaded so loading does not mask
it) is its own: KV "memory" is loaded into the memory tier by a warm-up prefill first;
KV "disk" and "redis" clear the memory tier before every timed prefill, so each run
reads every chunk from that tier.
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

from epic_rag.agreement import kl_divergence
from epic_rag.engine import EpicEngine
from epic_rag.store import STORAGE_DTYPES, KVStore, redact

from .accuracy import machine
from .data import DATA_ENV, essay_chunks, essay_folder
from .devices import add_device_arguments, resolve_device_arguments
from .records import fit_chunks
from .ttft import QUESTION

METHODS = ("full", "cacheblend:0.15", "attnlink:16", "reuse")
SOURCES = ("memory", "disk", "redis")
KL_METHODS = ("reuse", "attnlink:16")  # storage precision matters where cached KV is linked
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
    redis = cell["source"] == "redis"  # memory over Redis only: no disk tier to hide it
    store = KVStore(kv_url=cell["kv_url"], require_kv_url=True) if redis else KVStore(cell["store"])
    engine = EpicEngine.from_pretrained(cell["model"], store=store, device=cell["device"], dtype=cell["dtype"])
    ids = engine.add_chunks(cell["chunks"], progress=False)  # all hits: they were compiled by the parent
    engine.store.clear_memory()
    layout = engine.layout(QUESTION, ids)
    gc.collect()
    _reset_peak_rss()
    baseline = _status_mib("VmRSS")
    engine.prefill(layout, cell["method"])  # warm-up; fills the memory tier for source "memory"
    times = []
    for _ in range(cell["repeats"]):
        if cell["source"] in ("disk", "redis"):
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
        [sys.executable, "-m", "epic_rag_bench.scaling"],
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
    for name in STORAGE_DTYPES:
        with tempfile.TemporaryDirectory() as tmp:
            store = KVStore(tmp, dtype=name, fingerprint=engine.fingerprint)
            store.put(entry)
            disk = store.stats().disk_bytes
            memory = store.stored_form(entry).nbytes
        rows.append(
            {"dtype": name, "memory_bytes_per_token": memory / len(entry), "disk_bytes_per_token": disk / len(entry)}
        )
    return rows


def fetch_times(store: KVStore, keys: list[str], repeats: int = 3) -> list[dict]:
    """Median time to fetch one chunk entry from each tier of `store` (read and decoded)."""
    rows = []
    for backend in store.backends:
        times = []
        for _ in range(repeats):
            for key in keys:
                start = time.perf_counter()
                found = backend.get(key)
                times.append(time.perf_counter() - start)
                if found is None:
                    raise RuntimeError(f"the {backend.name} tier lost entry {key} during the benchmark")
        nbytes = statistics.mean(backend.get(k)[0].nbytes for k in keys)
        median = statistics.median(times)
        rows.append({"tier": backend.name, "ms_per_chunk": median * 1e3, "mb_per_s": nbytes / median / 1e6})
    return rows


def storage_kl(engine: EpicEngine, chunks: list[str]) -> list[dict]:
    """First-token KL(full recompute || method) with chunk KV kept in each storage dtype, and
    KL(fp32-stored || dtype-stored) for the same method: what the storage precision costs."""
    rows, fp32 = [], {}
    for name in STORAGE_DTYPES:
        shadow = EpicEngine(engine.model, engine.tokenizer, KVStore(dtype=name))  # same weights, own store
        layout = shadow.layout(QUESTION, shadow.add_chunks(chunks, progress=False))
        full = shadow.prefill(layout, "full").logits
        for method in KL_METHODS:
            logits = shadow.prefill(layout, method).logits
            fp32.setdefault(method, logits)
            rows.append(
                {
                    "dtype": name,
                    "method": method,
                    "kl_vs_full": float(kl_divergence(full, logits)),
                    "kl_vs_fp32_storage": float(kl_divergence(fp32[method], logits)),
                }
            )
    return rows


def _chunks_that_fit(engine: EpicEngine, chunks: list[str]) -> int:
    """How many leading chunks fit in the model's context with the question and one new token."""
    return len(fit_chunks(engine, chunks, engine.max_context - engine.layout(QUESTION, []).length - 1))


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    essays = essay_folder(args.essays)  # before the model loads: a missing folder fails at once
    store_dir = tempfile.mkdtemp(prefix="epic-scaling-")
    store = KVStore(store_dir, kv_url=args.kv_url, require_kv_url=True)  # a bad URL fails before the model loads
    resolve_device_arguments(args)
    engine = EpicEngine.from_pretrained(args.model, store=store, device=args.device, dtype=args.dtype)
    limit = min(args.max_tokens, engine.max_context)
    sizes = [s for s in args.sizes if s <= limit]
    chunks = essay_chunks(engine, max(sizes) // args.chunk_tokens, args.chunk_tokens, essays)
    chunks = chunks[: _chunks_that_fit(engine, chunks)]  # the largest size is the model's limit
    tokens = sum(engine.chunk_token_ids(c).numel() for c in chunks)
    start = time.perf_counter()
    keys = [chunk_id.removeprefix("kv:") for chunk_id in engine.add_chunks(chunks, progress=True)]
    index_s = time.perf_counter() - start
    fetch = fetch_times(engine.store, keys[:8])
    kl = storage_kl(engine, chunks[: max(1, args.kl_tokens // args.chunk_tokens)])
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
            "kv_url": args.kv_url,
            "device": args.device,
            "dtype": args.dtype,
        }
        rows.append(_spawn(cell))
    return {
        "model": args.model,
        "dtype": args.dtype,
        "machine": machine(),
        "repeats": args.repeats,
        "chunk_tokens": args.chunk_tokens,
        "indexing": {"tokens": tokens, "seconds": index_s, "tokens_per_s": tokens / index_s},
        "kv_bytes_per_token": storage_costs(engine, chunks[0]),
        "kv_tier": redact(args.kv_url) if args.kv_url else None,
        "fetch": fetch,
        "storage_kl": kl,
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
    lines += ["", f"| tier | fetch one {result['chunk_tokens']}-token chunk, ms | MB/s |", "|---|---:|---:|"]
    for r in result["fetch"]:
        rate = "no copy" if r["tier"] == "memory" else f"{r['mb_per_s']:.0f}"
        lines.append(f"| {r['tier']} | {r['ms_per_chunk']:.3f} | {rate} |")
    lines += ["", "| storage dtype | method | first-token KL vs full | KL vs fp32 storage |", "|---|---|---:|---:|"]
    lines += [
        f"| {r['dtype']} | {r['method']} | {r['kl_vs_full']:.5f} | {r['kl_vs_fp32_storage']:.2e} |"
        for r in result["storage_kl"]
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
    parser.add_argument(
        "--sources",
        type=lambda s: s.split(","),
        default=None,
        help="memory,disk[,redis] (default: all; redis only with --kv-url)",
    )
    parser.add_argument(
        "--kv-url", default=None, help="a Redis server to measure as a KV tier, redis://[user:password@]host:port/db"
    )
    parser.add_argument("--kl-tokens", type=int, default=2048, help="context of the storage-dtype KL measurement")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192])
    parser.add_argument("--max-tokens", type=int, default=8192, help="largest context measured (CPU time cap)")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--essays", type=Path, default=None, help=f"folder of .txt essays (default: ${DATA_ENV}/haystack)"
    )
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench-scaling"))
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from .plots import plot_scaling

    if args.sources is None:
        args.sources = [s for s in SOURCES if s != "redis" or args.kv_url]
    unknown = set(args.sources) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown KV sources {sorted(unknown)}; use memory, disk and/or redis")
    if "redis" in args.sources and not args.kv_url:
        raise ValueError("the redis source needs a server: pass --kv-url redis://host:port/db")
    result = run(args)
    (args.out / "scaling.json").write_text(json.dumps(result, indent=2))
    (args.out / "scaling.md").write_text(format_table(result))
    plot_scaling(result["rows"], args.out / "scaling.png", title=f"{result['model']}, {result['machine']}")
    print(format_table(result))
    return 0


if __name__ == "__main__":  # one cell, its description as JSON on stdin (used by `_spawn`)
    print(json.dumps(run_cell(json.loads(sys.stdin.read()))))
