"""`epic-rag bench decode-batch`: the time of one batched decode step per batch size.

What `--max-batch` trades: B answers stepped together cost one forward whose matrix
products have B rows. On a CPU that forward costs about one read of the weights while the
GEMM kernel streams them, and more once it starts repacking them (the step time jumps at
the batch size where it does); the table shows where, on this machine and model. Each
answer's cache holds a prompt of --prompt-tokens linked cached chunks, as after a prefill.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from epic_rag import EpicEngine
from epic_rag.batch_decode import decode_step
from epic_rag.offline import DEFAULT_MODEL

from .devices import add_device_arguments, resolve_device_arguments
from .output import write_result

FILLER = "The harbour log notes {i} boats, {j} storms and one lighthouse keeper who writes it all down."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model to step (default {DEFAULT_MODEL})")
    parser.add_argument("--batches", default="1,2,3,4,6,8", help="batch sizes (default 1,2,3,4,6,8)")
    parser.add_argument("--prompt-tokens", type=int, default=1900, help="each answer's prompt length (default 1900)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per batch size (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_device_arguments(parser)
    parser.add_argument("--out", help="folder for results.json")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    resolve_device_arguments(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = sorted(int(b) for b in args.batches.split(","))
    engine = EpicEngine.from_pretrained(args.model, device=args.device, dtype=args.dtype)
    prefilled = [_prefill(engine, args.prompt_tokens, b, args.steps + 1) for b in range(max(batches))]
    rows = []
    for b in tqdm(batches, desc="batch sizes", unit="size"):
        caches = [p.cache for p in prefilled[:b]]
        tokens = [int(p.logits.argmax()) for p in prefilled[:b]]
        lengths = [c.length for c in caches]
        times = []
        for step in range(args.steps + 1):  # the first is a warm-up
            start = time.perf_counter()
            decode_step(engine.model, caches, tokens)
            if step:
                times.append(time.perf_counter() - start)
        for cache, length in zip(caches, lengths, strict=True):
            cache.length = length  # the next batch size steps from the same prompts
        step_ms = 1000 * statistics.median(times)
        rows.append({"batch": b, "step_ms": step_ms, "tokens_per_s": 1000 * b / step_ms})
    alone = rows[0]["tokens_per_s"] if rows[0]["batch"] == 1 else None
    table = format_table(rows, args, alone)
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k not in ("func", "out")}
        write_result(Path(args.out), {"settings": settings, "rows": rows}, table)
    else:
        print(table)
    return 0


def _prefill(engine: EpicEngine, prompt_tokens: int, seed: int, extra: int):
    """A prompt of cached chunks (distinct per answer) prefilled under the default policy."""
    chunks, total = [], 0
    while total < prompt_tokens:
        text = " ".join(FILLER.format(i=seed * 1000 + len(chunks) * 10 + k, j=k) for k in range(12))
        chunks.append(text)
        total += engine.chunk_token_ids(text).numel()
    ids = engine.add_chunks(chunks, progress=False)
    return engine.prefill(engine.layout(f"What does log {seed} say?", ids), extra_capacity=extra)


def format_table(rows: list[dict], args: argparse.Namespace, alone: float | None) -> str:
    head = (
        f"{args.model} on {args.device} ({args.dtype}), {torch.get_num_threads()} threads, prompts of "
        f"{args.prompt_tokens} tokens; median of {args.steps} steps\n\n"
        "| batch | step ms | tokens/s | x one answer |\n|---:|---:|---:|---:|"
    )
    body = [
        f"| {r['batch']} | {r['step_ms']:.0f} | {r['tokens_per_s']:.1f} | "
        + (f"{r['tokens_per_s'] / alone:.2f} |" if alone else " |")
        for r in rows
    ]
    return "\n".join([head, *body])
