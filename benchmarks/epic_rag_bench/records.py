"""Evaluation records: LongBench-format jsonl cut into chunks, and needle-in-a-haystack sets.

A record is a question, the chunks retrieved for it (in order) and the gold answers.
LongBench contexts are chunked either at their natural "Passage N:" units or with
KVSplit (`epic_rag.chunking`). Needle records hide one sentence at a chosen depth of
a context built from plain-text essays, cut into fixed chunks of about 512 tokens.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from epic_rag.compile import nearest_neighbours
from epic_rag.compile_spec import CompileMode

PASSAGE = re.compile(r"Passage \d+:")
CHUNKINGS = ("passages", "kvsplit")
NEEDLE = "The best thing to do in San Francisco is to eat a sandwich and sit in Dolores Park on a sunny day."
NEEDLE_QUESTION = "What is the best thing to do in San Francisco?"
NEEDLE_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"


@dataclass
class Record:
    id: str
    question: str
    chunks: list[str]
    answers: list[str]
    dataset: str = ""
    meta: dict = field(default_factory=dict)
    index: ChunkIndex | None = None  # the chunks it was retrieved from (None: its own chunks, one document)


@dataclass
class ChunkIndex:
    """The chunks a benchmark's questions retrieve from, as an index holds them: what each
    chunk is compiled after under a compile mode (see `epic_rag.compile_spec`)."""

    texts: list[str]
    previous: list[str | None]  # each chunk's predecessor in its document (None for a first chunk)
    vectors: torch.Tensor | None = None  # [chunks, dim] embeddings, for similar compile
    _near: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    @classmethod
    def of_document(cls, texts: list[str], encode: Callable[[list[str]], object] | None = None) -> ChunkIndex:
        """One document's chunks in order (embedded with `encode` when given)."""
        vectors = torch.as_tensor(encode(texts), dtype=torch.float64) if encode is not None else None
        return cls(texts, [None, *texts[:-1]], vectors)

    def contexts(self, chunks: list[str], mode: CompileMode) -> dict:
        """`add_chunks` keywords compiling `chunks` (texts of this index) under `mode`; a chunk
        not in the index (cut to fit a prompt) is compiled alone or after the head only."""
        if mode.kind == "alone":
            return {}
        where = {text: i for i, text in enumerate(self.texts)}
        if mode.kind == "neighbour":
            return {"after": [self.previous[where[c]] if c in where else None for c in chunks]}
        if self.vectors is None:
            raise ValueError("similar compile needs the index's embeddings")
        if mode.n not in self._near:
            self._near[mode.n] = nearest_neighbours(self.vectors, mode.n)
        near = self._near[mode.n]
        return {"link_after": [[self.texts[j] for j in near[where[c]]] if c in where else [] for c in chunks]}


def read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    """The first `limit` (all when None) JSON objects of a jsonl file."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path} holds no records")
    return rows


def split_passages(context: str) -> list[str]:
    """The "Passage N: ..." units of a LongBench context (the whole text when it has none)."""
    starts = [m.start() for m in PASSAGE.finditer(context)]
    if not starts or starts[0] != 0:
        starts = [0] + starts
    pieces = [context[a:b].strip() for a, b in itertools.pairwise([*starts, len(context)])]
    return [p for p in pieces if p]


def make_chunker(engine, mode: str) -> Callable[[str], list[str]]:
    """Context -> chunk texts, at passage units or with KVSplit in the engine's tokenizer."""
    if mode == "passages":
        return split_passages
    if mode != "kvsplit":
        raise ValueError(f"unknown chunking {mode!r}; choose one of {', '.join(CHUNKINGS)}")
    try:
        from epic_rag.chunking import KVSplit, count_tokens_with
    except ImportError as err:
        raise ValueError(f"--chunking kvsplit needs epic_rag.chunking.KVSplit, which is not available: {err}") from None
    splitter = KVSplit(count_tokens_with(engine.tokenizer), separator=PASSAGE)
    return lambda context: [c.text.strip() for c in splitter.split(context) if c.text.strip()]


def longbench_records(path: Path, chunker: Callable[[str], list[str]], limit: int | None = None) -> list[Record]:
    """Records of a LongBench-format jsonl (`input`, `context`, `answers`)."""
    records = []
    for i, row in enumerate(read_jsonl(path, limit)):
        missing = {"input", "context", "answers"} - row.keys()
        if missing:
            raise ValueError(f"{path}: record {i} lacks {sorted(missing)}")
        records.append(
            Record(
                id=str(row.get("_id") or i),
                question=row["input"],
                chunks=chunker(row["context"]),
                answers=list(row["answers"]),
                dataset=row.get("dataset", ""),
            )
        )
    return records


def fit_chunks(engine, chunks: list[str], budget: int) -> list[str]:
    """The leading chunks whose tokens fit in `budget`; the first one is cut to fit if it alone is too long."""
    kept, used = [], 0
    for text in chunks:
        n = engine.chunk_token_ids(text).numel()
        if used + n > budget:
            if not kept and budget > 0:
                kept.append(engine.tokenizer.decode(engine.tokenize(text)[: max(1, budget - 8)]).strip())
            break
        kept.append(text)
        used += n
    return kept


def token_pieces(engine, text: str, tokens: int) -> list[str]:
    """`text` cut into consecutive pieces of `tokens` tokens (decoded back to text)."""
    ids = engine.tokenize(text)
    return [engine.tokenizer.decode(ids[i : i + tokens]).strip() for i in range(0, ids.numel(), tokens)]


def needle_records(
    engine, essays: Path, lengths: list[int], depths: list[float], chunk_tokens: int = 512
) -> list[Record]:
    """One record per (context length, depth): essays up to `length` tokens, the needle sentence
    inserted at the sentence boundary nearest `depth` (0..1) of the text, cut into chunks."""
    files = sorted(Path(essays).glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt essays under {essays}")
    haystack = "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip() for f in files)
    ids = engine.tokenize(haystack)
    records = []
    for length in lengths:
        if length > ids.numel():
            raise ValueError(f"the essays hold {ids.numel()} tokens, fewer than the context length {length}")
        body = engine.tokenizer.decode(ids[:length])
        for depth in depths:
            at = _sentence_boundary(body, depth)
            text = (body[:at] + " " + NEEDLE + " " + body[at:]).strip()
            records.append(
                Record(
                    id=f"needle-{length}-{round(depth * 100)}",
                    question=NEEDLE_QUESTION,
                    chunks=token_pieces(engine, text, chunk_tokens),
                    answers=[NEEDLE_ANSWER],
                    dataset="needle",
                    meta={"context_tokens": length, "depth": depth},
                )
            )
    return records


def _sentence_boundary(text: str, depth: float) -> int:
    """Index just after the sentence end nearest `depth` of the text (0 or len at the ends)."""
    if depth <= 0:
        return 0
    if depth >= 1:
        return len(text)
    target = depth * len(text)
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s)", text)]
    return min(ends, key=lambda e: abs(e - target)) if ends else int(target)
