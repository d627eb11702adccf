"""Accuracy against speed: every method on the same records, same engine, same prompt.

For each record the chunks are compiled first (index time, not part of TTFT), then
every method prefills the same layout from the cache, answers greedily, and is
compared with full recompute: KL of the first-token distribution, mean KL along full
recompute's own greedy answer (teacher forced), and exact match of the answers.
Per-record results are saved under DIR/records/ as they finish, so a rerun (or a
larger --limit) only computes what is missing.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from epic_rag.app.cli import compile_arg
from tqdm.auto import tqdm

from epic_rag.agreement import ReferenceCache, against_reference, greedy_decode
from epic_rag.chunking import load_sentence_encoder
from epic_rag.compile_spec import ALONE, CompileMode
from epic_rag.engine import EpicEngine
from epic_rag.offline import DEFAULT_MODEL, builtin_compile, builtin_policy
from epic_rag.policies import parse_policy
from epic_rag.policy_spec import DEFAULT_POLICY
from epic_rag.store import STORAGE_DTYPES, KVStore

from .devices import add_device_arguments, resolve_device_arguments, torch_dtype
from .records import CHUNKINGS, ChunkIndex, Record, fit_chunks, longbench_records, make_chunker
from .scoring import best_over_golds, contains_answer, exact_match, rouge_l, token_f1

SYSTEM = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
QUESTION_TEMPLATE = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nQuestion: {question}\nAnswer:"
)
METHODS = ("full", "reuse", "prefix", "cacheblend:0.15") + tuple(f"attnlink:{k}" for k in (1, 2, 4, 8, 16, 32))
REFERENCE = "full"
SUMMARY_MEDIANS = ("ttft_s", "kv_load_s", "link_s", "recompute_s")
SUMMARY_SPREAD = ("kl_vs_full", "kl_tf_vs_full")  # also reported as medians: a few records dominate their means
SUMMARY_MEANS = (
    "exact",
    "contains",
    "f1",
    "rouge_l",
    "recomputed_fraction",
    "kl_vs_full",
    "kl_tf_vs_full",
    "agree_vs_full",
    "tokens",
)


def _method_result(engine, layout, policy, record: Record, max_new: int, reference: dict | None) -> tuple[dict, dict]:
    """(saved metrics, in-memory reference data) of one method on one record."""
    pre = engine.prefill(layout, policy, extra_capacity=max_new + 1)
    if reference is None:
        ids, steps = greedy_decode(engine, pre, layout.length, max_new)
    else:
        ids, kl_first, kl_tf = against_reference(engine, pre, layout.length, max_new, reference)
    answer = engine.tokenizer.decode([t for t in ids if t not in engine.stop_token_ids], skip_special_tokens=True)
    answer = answer.strip()
    s = pre.stats
    row = {
        "answer": answer,
        **answer_scores(answer, record.answers),
        "rouge_l": best_over_golds(rouge_l, answer, record.answers),
        "ttft_s": s.ttft_s,
        "kv_load_s": s.kv_load_s,
        "link_s": s.link_s,
        "recompute_s": s.recompute_s,
        "recomputed_fraction": s.recomputed_fraction,
        "tokens": s.tokens_total,
        "store_misses": s.store_misses,
    }
    if reference is None:
        row.update(kl_vs_full=0.0, kl_tf_vs_full=0.0, agree_vs_full=1.0)
        return row, {"ids": ids, "steps": torch.stack(steps), "answer": answer}
    row["kl_vs_full"], row["kl_tf_vs_full"] = kl_first, kl_tf
    row["agree_vs_full"] = float(answer == reference["answer"])
    return row, {}


@functools.cache
def _sentence_encoder():
    """MiniLM, loaded once per process: the embedder a similar compile ranks each record's chunks by."""
    return load_sentence_encoder()


def answer_scores(answer: str, golds: list[str]) -> dict[str, float]:
    """Exact match, whether a gold answer is contained in it (a correct answer in a sentence), F1."""
    return {
        "exact": best_over_golds(exact_match, answer, golds),
        "contains": best_over_golds(contains_answer, answer, golds),
        "f1": best_over_golds(token_f1, answer, golds),
    }


def context_budget(engine: EpicEngine, question: str, max_new: int, max_context_tokens: int | None) -> int:
    """Tokens left for chunks once the prompt around them and the answer are counted."""
    overhead = engine.layout(QUESTION_TEMPLATE.format(question=question), [], SYSTEM).length + max_new + 1
    return min(max_context_tokens or engine.max_context, engine.max_context) - overhead


def evaluate_record(
    engine: EpicEngine,
    record: Record,
    methods: list[str],
    max_new: int,
    max_context_tokens: int | None,
    done: dict,
    references: ReferenceCache,
    compile: CompileMode = ALONE,
) -> dict:
    """Metrics of every method in `methods` missing from `done` (method -> metrics) on `record`,
    its chunks compiled under `compile` (after what `record.index` says; else one document)."""
    chunks = fit_chunks(engine, record.chunks, context_budget(engine, record.question, max_new, max_context_tokens))
    t0 = time.perf_counter()
    if record.index is None and compile.kind != "alone":
        embed = _sentence_encoder() if compile.kind == "similar" else None
        record.index = ChunkIndex.of_document(record.chunks, embed)
    index = record.index or ChunkIndex.of_document(record.chunks)
    chunk_ids = engine.add_chunks(chunks, progress=False, **index.contexts(chunks, compile))
    index_s = time.perf_counter() - t0
    layout = engine.layout(QUESTION_TEMPLATE.format(question=record.question), chunk_ids, SYSTEM)
    engine.prefill(layout, "reuse")  # warm-up: caches the system prefix, warms kernels
    todo = [m for m in methods if m not in done]
    out = dict(done)
    key = references.key(engine, layout.ids, max_new)
    reference = references.load(key) if REFERENCE not in todo else None
    if reference is None:
        row, reference = _method_result(engine, layout, parse_policy(REFERENCE), record, max_new, None)
        references.save(key, reference)
        if REFERENCE in todo:  # a row saved earlier keeps its own timings
            out[REFERENCE] = row
    for spec in tqdm([m for m in todo if m != REFERENCE], desc="methods", unit="method", leave=False):
        out[spec], _ = _method_result(engine, layout, parse_policy(spec), record, max_new, reference)
    for row in out.values():
        row.setdefault("index_s", index_s)
    return out


def summarise(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method: medians of times, means of scores and agreement, speed-up vs full."""
    summary = {}
    for spec, items in rows.items():
        summary[spec] = {"n": len(items)}
        summary[spec].update({k: statistics.median(r[k] for r in items) for k in SUMMARY_MEDIANS})
        # records saved before a metric existed lack it: the mean is over those that have it
        summary[spec].update({k: _mean([r[k] for r in items if k in r]) for k in SUMMARY_MEANS})
        summary[spec].update({f"{k}_median": statistics.median(r[k] for r in items) for k in SUMMARY_SPREAD})
    full = summary.get(REFERENCE)
    for item in summary.values():
        item["speedup_vs_full"] = full["ttft_s"] / item["ttft_s"] if full else None
    return summary


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def format_table(result: dict) -> str:
    """Markdown table of the summary, one row per method."""
    stored = f", KV stored as {result['store_dtype']}" if result.get("store_dtype") else ""
    stored += f", chunk KV compiled {result['compile']}" if result.get("compile", "alone") != "alone" else ""
    head = (
        f"model {result['model']} ({result['dtype']}{stored}, {result['machine']}), {result['records']} records of "
        f"{result['data']}, chunking {result['chunking']}, mean {result['mean_tokens']:.0f} prompt tokens\n\n"
        "| method | EM | correct | F1 | Rouge-L | TTFT s (median) | speed-up vs full | recomputed | KL first token | "
        "KL teacher-forced | agree with full |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = [
        f"| {spec} | {m['exact'] * 100:.1f} | {m['contains'] * 100:.1f} | {m['f1'] * 100:.1f} | "
        f"{m['rouge_l'] * 100:.1f} | {m['ttft_s']:.3f} | "
        f"{_speedup(m['speedup_vs_full'])} | {m['recomputed_fraction'] * 100:.1f}% | "
        f"{m['kl_vs_full']:.3f} | {m['kl_tf_vs_full']:.3f} | {m['agree_vs_full'] * 100:.0f}% |"
        for spec, m in result["methods"].items()
    ]
    return head + "\n".join(lines) + "\n"


def _speedup(value: float | None) -> str:
    """A speed-up cell; a dash when full recompute was not among the methods."""
    return f"{value:.1f}x" if value is not None else "—"


def _settings(args: argparse.Namespace, source: str) -> dict:
    return {
        "model": args.model,
        "dtype": args.dtype,
        "data": source,
        "chunking": args.chunking,
        "max_context_tokens": args.max_context_tokens,
        "max_new_tokens": args.max_new_tokens,
        "prompt": hashlib.sha256((SYSTEM + QUESTION_TEMPLATE).encode()).hexdigest()[:16],
        **({"compile": args.compile} if args.compile != "alone" else {}),  # absent: folders from before the option
        **({"store_dtype": args.store_dtype} if args.store_dtype else {}),  # absent: folders from before the option
    }


def _check_settings(out: Path, settings: dict) -> None:
    """Refuse to mix results of other settings into one output folder."""
    path = out / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != settings:
            diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
            raise ValueError(f"{out} holds results of other settings {diff}; choose another --out")
    else:
        path.write_text(json.dumps(settings, indent=2))


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def run_records(args: argparse.Namespace, engine: EpicEngine, records: list[Record], source: str) -> dict:
    """Evaluate (or resume) every record, then write results.json, results.md and the plot."""
    from .plots import plot_f1_vs_ttft

    out = Path(args.out)
    (out / "records").mkdir(parents=True, exist_ok=True)
    _check_settings(out, _settings(args, source))
    methods = list(dict.fromkeys(args.methods))
    compile = CompileMode.parse(args.compile)
    per_method: dict[str, list[dict]] = {m: [] for m in methods}
    references = ReferenceCache(args.reference_cache)
    for record in tqdm(records, desc="records", unit="record"):
        path = out / "records" / f"{hashlib.sha256(record.id.encode()).hexdigest()[:16]}.json"
        saved = json.loads(path.read_text()) if path.exists() else {"id": record.id, "methods": {}}
        if not set(methods) <= saved["methods"].keys():
            done = {m: r for m, r in saved["methods"].items() if m in methods}
            todo = (methods, args.max_new_tokens, args.max_context_tokens, done, references, compile)
            saved["methods"].update(evaluate_record(engine, record, *todo))
            saved.update(question=record.question, answers=record.answers, meta=record.meta)
            _write_json(path, saved)
        for m in methods:
            row = saved["methods"][m]
            if "answer" in row:  # scores added since the record was saved come from its saved answer
                row = {**answer_scores(row["answer"], saved.get("answers", record.answers)), **row}
            per_method[m].append(row)
    summary = summarise(per_method)
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "store_dtype": args.store_dtype,
        "machine": machine(),
        "data": source,
        "chunking": args.chunking,
        "compile": args.compile,
        "records": len(records),
        "mean_tokens": statistics.fmean(r["tokens"] for rows in per_method.values() for r in rows),
        "max_new_tokens": args.max_new_tokens,
        "methods": summary,
    }
    _write_json(out / "results.json", result)
    (out / "results.md").write_text(format_table(result))
    plot_f1_vs_ttft(summary, out / "f1_vs_ttft.png", title=f"{args.model}, {len(records)} records of {source}")
    return result


def machine() -> str:
    """A one-line description of where this ran."""
    return f"{platform.machine()} {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def load_engine(args: argparse.Namespace) -> EpicEngine:
    return EpicEngine.from_pretrained(
        args.model, store=KVStore(dtype=args.store_dtype), dtype=torch_dtype(args), device=args.device
    )


def apply_model_defaults(args: argparse.Namespace) -> None:
    """Fill in what the user left to the model: its default policy among the methods (so a default
    that wins shows in every table) and its default compile mode; the device and dtype. Checks
    every method's spec."""
    if args.methods is None:
        args.methods = list(dict.fromkeys([*args.default_methods, builtin_policy(args.model) or DEFAULT_POLICY]))
    args.compile = args.compile or builtin_compile(args.model) or "alone"
    resolve_device_arguments(args)
    for method in args.methods:
        parse_policy(method)


def parse_methods(text: str) -> list[str]:
    """Comma-separated policy specs; a bare number repeats the previous family with a new
    argument, so "full,attnlink:1,2,4" means full, attnlink:1, attnlink:2, attnlink:4."""
    methods: list[str] = []
    for item in (x.strip() for x in text.split(",")):
        if item and item.replace(".", "", 1).isdigit() and methods and ":" in methods[-1]:
            item = f"{methods[-1].split(':')[0]}:{item}"
        if item:
            methods.append(item)
    return methods


def add_common_arguments(
    parser: argparse.ArgumentParser, methods: tuple[str, ...] = METHODS, max_new_tokens: int = 32
) -> None:
    """Options shared by `bench accuracy`, `bench qa` and `bench needle`."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, folder or .gguf")
    parser.add_argument(
        "--methods",
        type=parse_methods,
        default=None,
        help=f"policies, comma-separated (default {','.join(methods)} and the model's default policy)",
    )
    parser.set_defaults(default_methods=methods)
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument(
        "--max-context-tokens", type=int, default=None, help="cap the prompt (default: the model's limit)"
    )
    add_device_arguments(parser)
    parser.add_argument(
        "--store-dtype",
        choices=list(STORAGE_DTYPES),
        default=None,
        help="dtype the chunk KV is stored in, dequantized when linked (default: the model's --dtype)",
    )
    parser.add_argument(
        "--compile",
        type=compile_arg,
        default=None,
        metavar="MODE",
        help="how chunk KV is compiled: alone, neighbour (after its predecessor) or similar:N (after the N most "
        "similar chunks of the index, linked); default: the model's default compile mode, else alone",
    )
    parser.add_argument(
        "--reference-cache",
        type=Path,
        default=None,
        help="folder keeping full recompute's answers, so added methods skip full prefill "
        "(default: the epic-rag cache folder)",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="LongBench-format jsonl (input, context, answers)")
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    parser.add_argument(
        "--skip", type=int, default=0, help="leave out the first N records (tune on some, report on others)"
    )
    parser.add_argument("--chunking", choices=CHUNKINGS, default="passages")
    parser.add_argument("--out", type=Path, default=Path("bench-accuracy"), help="output folder (resumable)")
    add_common_arguments(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    apply_model_defaults(args)
    engine = load_engine(args)
    records = longbench_records(args.data, make_chunker(engine, args.chunking), args.limit)[args.skip :]
    result = run_records(args, engine, records, args.data.name)
    print(format_table(result))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'f1_vs_ttft.png'}")
    return 0
