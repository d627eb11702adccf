"""Compute dtypes on this machine: TTFT and first-token KL against float32's full prefill.

The same prompt (a question after N essay chunks of ~512 tokens, as `bench ttft` builds it)
runs under each method in each dtype, chunk KV compiled in that dtype beforehand. KL is
measured against float32's full recompute, so the dtype's rounding and the method's
approximation add up in one number; float32's own rows show the method alone. A CPU
without native bf16 or fp16 arithmetic may run them slower than float32: this says so.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from epic_rag.agreement import kl_divergence
from epic_rag.devices import dtype_name, resolve_device
from epic_rag.engine import EpicEngine
from epic_rag.offline import DEFAULT_MODEL

from .accuracy import machine
from .data import essay_chunks, essay_folder
from .ttft import QUESTION

METHODS = ("full", "attnlink:16", "reuse")


def measure(model: str, device: str, dtypes: list[str], chunks: list[str], repeats: int) -> list[dict]:
    """Per (dtype, method): median TTFT and first-token KL to float32's full recompute."""
    rows, reference = [], None
    for name in dtypes:
        engine = EpicEngine.from_pretrained(model, device=device, dtype=name)
        layout = engine.layout(QUESTION, engine.add_chunks(chunks, progress=False))
        engine.prefill(layout, "reuse")  # warm-up: the prompt head stored, kernels warm
        for method in tqdm(METHODS, desc=name, unit="method", leave=False):
            results = [engine.prefill(layout, method) for _ in range(repeats)]
            logits = results[-1].logits
            if reference is None and name == "float32" and method == "full":
                reference = logits
            rows.append(
                {
                    "dtype": name,
                    "method": method,
                    "ttft_s": statistics.median(r.stats.ttft_s for r in results),
                    "kl_vs_fp32_full": float(kl_divergence(reference, logits)) if reference is not None else None,
                    "tokens": layout.length,
                }
            )
    return rows


def format_table(result: dict) -> str:
    head = (
        f"model {result['model']} on {result['device']} ({result['machine']}), {result['chunks']} chunks, "
        f"{result['tokens']} prompt tokens, median of {result['repeats']}\n\n"
        "| dtype | method | TTFT s | x float32's TTFT | first-token KL vs float32 full |\n|---|---|---:|---:|---:|\n"
    )
    base = {r["method"]: r["ttft_s"] for r in result["rows"] if r["dtype"] == "float32"}
    lines = [
        f"| {r['dtype']} | {r['method']} | {r['ttft_s']:.3f} | "
        f"{r['ttft_s'] / base[r['method']]:.2f} | {r['kl_vs_fp32_full']:.4f} |"
        for r in result["rows"]
    ]
    return head + "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, folder or .gguf")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best present)")
    parser.add_argument(
        "--dtypes",
        type=lambda s: [dtype_name(x) for x in s.split(",")],
        default=["float32", "bfloat16", "float16"],
        help="compute dtypes, float32 first (the reference; default float32,bfloat16,float16)",
    )
    parser.add_argument("--chunks", type=int, default=4, help="~512-token essay chunks in the prompt (default 4)")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--essays", type=Path, default=None, help="folder of .txt essays (default: $EPIC_RAG_DATA/haystack)"
    )
    parser.add_argument("--out", type=Path, default=None, help="write the result JSON here")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.dtypes[0] != "float32":
        raise ValueError("--dtypes must start with float32: it is the reference the others are measured against")
    essays = essay_folder(args.essays)
    device = resolve_device(args.device)
    probe = EpicEngine.from_pretrained(args.model, device=device)
    chunks = essay_chunks(probe, args.chunks, args.chunk_tokens, essays)
    del probe
    rows = measure(args.model, device, args.dtypes, chunks, args.repeats)
    result = {
        "model": args.model,
        "device": device,
        "machine": machine(),
        "chunks": args.chunks,
        "tokens": rows[0]["tokens"],
        "repeats": args.repeats,
        "torch": torch.__version__,
        "rows": rows,
    }
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return 0
