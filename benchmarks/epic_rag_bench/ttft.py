"""TTFT per method as the number of ~512-token chunks grows (median of N runs).

Every method runs on the same engine and inputs. Chunk KV is compiled before
timing (index time) and served from the memory tier, or from disk with
``--from-disk``. The ``floor`` row is a plain HF forward of as many new tokens as
AttnLink(16) recomputes, over an already-built cache of the same total length:
the least time that much compute can take.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from epic_rag.engine import EpicEngine
from epic_rag.offline import DEFAULT_MODEL
from epic_rag.policies import AttnLink, parse_policy
from epic_rag.store import KVStore

from .data import DATA_ENV, essay_chunks, essay_folder
from .devices import add_device_arguments, resolve_device_arguments, torch_dtype

QUESTION = (
    "Based only on the essays above, which essay argues most directly about how people should choose "
    "what to work on, and what reason does its author give?"
)
METHODS = ("full", "prefix", "cacheblend:0.15", "attnlink:16", "guided:16", "reuse")


def hf_floor_seconds(engine: EpicEngine, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    """Median time of a plain HF forward of the last `new_tokens` ids over a cache of the rest."""
    from transformers import DynamicCache

    past_len = ids.numel() - new_tokens
    with torch.inference_mode():
        cache = DynamicCache(config=engine.model.config)
        engine.model(input_ids=ids[None, :past_len].to(engine.device), cache=cache, use_cache=True)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            engine.model(
                input_ids=ids[None, past_len:].to(engine.device), cache=cache, use_cache=True, logits_to_keep=1
            )
            times.append(time.perf_counter() - start)
            cache.crop(-new_tokens)  # drop the new tokens again
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    resolve_device_arguments(args)
    essays = essay_folder(args.essays)  # before the model loads: a missing folder fails at once
    store_dir = tempfile.mkdtemp(prefix="epic-bench-") if args.from_disk else None
    engine = EpicEngine.from_pretrained(
        args.model, store=KVStore(store_dir), dtype=torch_dtype(args), device=args.device
    )
    counts = sorted(args.chunks)
    chunks = essay_chunks(engine, max(counts), args.chunk_tokens, essays)
    chunk_ids = engine.add_chunks(chunks, progress=True)
    engine.layout(QUESTION, chunks[:1])  # warm the tokenizer and template
    policies = [parse_policy(m) for m in args.methods]
    rows = []
    total = len(counts) * (len(policies) + 1)
    with tqdm(total=total, desc="ttft", unit="cell") as bar:
        for n in counts:
            layout = engine.layout(QUESTION, chunk_ids[:n])
            engine.prefill(layout, AttnLink(16))  # warm-up (allocator, kernels)
            for policy in policies:
                runs = []
                for _ in range(args.repeats):
                    if args.from_disk:
                        engine.store.clear_memory()
                    runs.append(engine.prefill(layout, policy).stats)
                med = statistics.median(r.ttft_s for r in runs)
                rows.append(
                    {
                        "chunks": n,
                        "tokens": layout.length,
                        "method": policy.spec,
                        "ttft_s": med,
                        "kv_load_s": statistics.median(r.kv_load_s for r in runs),
                        "link_s": statistics.median(r.link_s for r in runs),
                        "recompute_s": statistics.median(r.recompute_s for r in runs),
                        "tokens_recomputed": runs[0].tokens_recomputed,
                        "recomputed_fraction": runs[0].recomputed_fraction,
                    }
                )
                bar.update()
            attn = engine.prefill(layout, AttnLink(16)).stats.tokens_recomputed
            floor = hf_floor_seconds(engine, layout.ids, attn, args.repeats)
            rows.append(
                {"chunks": n, "tokens": layout.length, "method": "floor", "ttft_s": floor, "tokens_recomputed": attn}
            )
            bar.update()
    for row in rows:
        full = next(r["ttft_s"] for r in rows if r["chunks"] == row["chunks"] and r["method"] == "full")
        floor = next(r["ttft_s"] for r in rows if r["chunks"] == row["chunks"] and r["method"] == "floor")
        row["speedup_vs_full"] = full / row["ttft_s"]
        row["x_floor"] = row["ttft_s"] / floor
    return {
        "model": args.model,
        "dtype": args.dtype,
        "device": str(engine.device),
        "threads": torch.get_num_threads(),
        "kv_from": "disk" if args.from_disk else "memory",
        "repeats": args.repeats,
        "kv_bytes_per_token": engine.kv_bytes_per_token,
        "rows": rows,
    }


def format_table(result: dict) -> str:
    head = (
        f"model {result['model']} ({result['dtype']}, {result['device']}, {result['threads']} threads), "
        f"KV from {result['kv_from']}, median of {result['repeats']}, "
        f"KV bytes/token {result['kv_bytes_per_token']}\n\n"
        "| chunks | tokens | method | TTFT s | speed-up vs full | x floor | recomputed | "
        "load s | link s | recompute s |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in result["rows"]:
        parts = [f"{r.get(k, float('nan')):.3f}" if k in r else "" for k in ("kv_load_s", "link_s", "recompute_s")]
        lines.append(
            f"| {r['chunks']} | {r['tokens']} | {r['method']} | {r['ttft_s']:.3f} | {r['speedup_vs_full']:.1f}x | "
            f"{r['x_floor']:.2f} | {r['tokens_recomputed']} | " + " | ".join(parts) + " |"
        )
    return head + "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help=f"built-in name, folder or .gguf (default model: {DEFAULT_MODEL})",
    )
    parser.add_argument("--chunks", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    parser.add_argument("--repeats", type=int, default=5)
    add_device_arguments(parser)
    parser.add_argument(
        "--from-disk", action="store_true", help="serve chunk KV from a disk store, memory tier cleared per run"
    )
    parser.add_argument(
        "--essays", type=Path, default=None, help=f"folder of .txt essays (default: ${DATA_ENV}/haystack)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    result = run(args)
    table = format_table(result)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0
