"""Question answering over a documents folder: retrieval as a RAG app does it, every method scored.

The corpus (the `.txt` and `.md` files directly in a folder) is cut with KVSplit into
the same chunks `epic-rag index` makes, each headed by its file name as LlamaIndex heads
a node. For each question the top-k chunks by MiniLM cosine similarity are compiled if
new (index time, not in TTFT) and linked in score order, and each method answers; the
accuracy harness scores it against the references and against full recompute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from epic_rag.chunking import KVSplit, count_tokens_with, load_sentence_encoder

from .accuracy import add_common_arguments, apply_model_defaults, format_table, load_engine, run_records
from .records import ChunkIndex, Record, read_jsonl

DOC_SUFFIXES = (".txt", ".md")
METHODS = ("full", "reuse", "cacheblend:0.15", "attnlink:16", "guided:16")


def corpus_chunks(engine, corpus: Path, target_tokens: int, max_tokens: int, min_tokens: int) -> ChunkIndex:
    """KVSplit chunks of every document in `corpus`, each as "file_name: NAME" + blank line + text,
    with each chunk's predecessor in its document (None for a document's first chunk)."""
    files = sorted(p for p in Path(corpus).iterdir() if p.is_file() and p.suffix in DOC_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no .txt or .md documents directly in {corpus}")
    count = count_tokens_with(engine.tokenizer)
    chunks, previous = [], []
    for path in tqdm(files, desc="chunking", unit="file"):
        header = f"file_name: {path.name}\n\n"
        splitter = KVSplit(count, target_tokens=target_tokens, max_tokens=max_tokens, min_tokens=min_tokens)
        pieces = splitter.split(path.read_text(encoding="utf-8"), reserve=count(header) + 2)
        texts = [header + c.text.strip() for c in pieces if c.text.strip()]
        chunks.extend(texts)
        previous.extend([None, *texts[:-1]])
    return ChunkIndex(chunks, previous)


def retrieve(index: ChunkIndex, questions: list[str], top_k: int) -> list[list[int]]:
    """Indices of the `top_k` chunks most similar to each question, best first (cosine, MiniLM);
    the chunks' embeddings stay on the index (similar compile uses them)."""
    encode = load_sentence_encoder()
    docs = np.asarray(encode(index.texts), dtype=np.float64)  # [chunks, dim]
    index.vectors = torch.from_numpy(docs.copy())
    queries = np.asarray(encode(questions), dtype=np.float64)  # [questions, dim]
    docs /= np.linalg.norm(docs, axis=1, keepdims=True).clip(1e-12)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True).clip(1e-12)
    scores = queries @ docs.T
    return [list(np.argsort(-row, kind="stable")[:top_k]) for row in scores]


def qa_records(engine, args: argparse.Namespace) -> list[Record]:
    """One record per question: its retrieved chunks (best first) and reference answers."""
    rows = read_jsonl(args.questions, args.limit)
    for i, row in enumerate(rows):
        if not {"question", "answers"} <= row.keys():
            raise ValueError(f"{args.questions}: question {i} needs 'question' and 'answers'")
    index = corpus_chunks(engine, args.corpus, args.target_tokens, args.max_tokens, args.min_tokens)
    top = retrieve(index, [r["question"] for r in rows], args.top_k)
    return [
        Record(
            id=str(row.get("id", i)),
            question=row["question"],
            chunks=[index.texts[j] for j in picked],
            answers=list(row["answers"]),
            dataset=args.questions.stem,
            meta={"hops": row.get("hops", 1)},
            index=index,
        )
        for i, (row, picked) in enumerate(zip(rows, top, strict=True))
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", type=Path, required=True, help="folder of .txt/.md documents")
    parser.add_argument("--questions", type=Path, required=True, help="jsonl: question, answers (see benchmarks/qa)")
    parser.add_argument("--top-k", type=int, default=8, help="chunks retrieved per question (default 8)")
    parser.add_argument("--target-tokens", type=int, default=256, help="KVSplit chunk size, as `epic-rag index`")
    parser.add_argument("--max-tokens", type=int, default=384)
    parser.add_argument("--min-tokens", type=int, default=48)
    parser.add_argument("--limit", type=int, default=None, help="first N questions only")
    parser.add_argument("--out", type=Path, default=Path("bench-qa"), help="output folder (resumable)")
    add_common_arguments(parser, METHODS, max_new_tokens=24)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    apply_model_defaults(args)
    args.chunking = f"kvsplit {args.target_tokens}/{args.max_tokens}/{args.min_tokens}, top {args.top_k}"
    engine = load_engine(args)
    records = qa_records(engine, args)
    result = run_records(args, engine, records, f"{args.questions.name} over {args.corpus.name}")
    print(format_table(result))
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}, {args.out / 'f1_vs_ttft.png'}")
    return 0
