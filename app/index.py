"""Wiring: documents -> KVSplit nodes -> KV store + FAISS index on disk -> query and chat engines.

An index folder holds ``storage/`` (LlamaIndex docstore + FAISS vectors; absent when the
nodes and vectors live in a Chroma server, see `vector_stores`), ``kv/`` (the
chunk KV store) and ``epic_rag_index.json`` (which model and embedder built it).
Reopening it loads both; the KV of every node is already in ``kv/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from epic_rag.integrations.llama_index.embeddings import DEFAULT_EMBED_MODEL, SentenceTransformerEmbedding
from epic_rag.integrations.llama_index.handoff import CallReport, Handoff, current_handoff, llm_text, set_handoff
from epic_rag.integrations.llama_index.llm import EpicLLM, last_call
from epic_rag.integrations.llama_index.node_parser import KVSplitNodeParser
from epic_rag.integrations.llama_index.postprocessor import EpicKVPostprocessor
from epic_rag.integrations.llama_index.precompute import EpicKVPrecompute
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex, load_index_from_storage
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.chat_engine import CondensePlusContextChatEngine, ContextChatEngine
from tqdm.auto import tqdm

from epic_rag import DEFAULT_MODEL, EpicEngine, RecomputePolicy
from epic_rag.calibration import CANDIDATES, PolicyScore, Sample, calibrate, recommend
from epic_rag.offline import builtin_name

from .history import BoundedHistory
from .prompts import CHAT_CONTEXT_TEMPLATE, CHAT_REFINE_TEMPLATE, CHAT_SYSTEM_PROMPT, QA_PROMPT, REFINE_PROMPT
from .settings import CHAT_RETRIEVAL, HISTORY_TOKENS
from .vector_stores import chroma_vector_store, node_count, parse_chroma_url

logger = logging.getLogger(__name__)

MANIFEST = "epic_rag_index.json"
COMPILE_MODES = ("alone", "neighbour")
LONG_PREFILL_TOKENS = 4096  # a prefill computing this many tokens shows a progress bar
SKIP_DIRS = {".git", "__pycache__", ".ipynb_checkpoints"}


@dataclass
class IndexManifest:
    """What built an index folder (checked when it is reopened) and the policy calibrated on it."""

    model: str
    fingerprint: str
    embed_model: str
    documents: int
    nodes: int
    chunking: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None  # recommended by `epic-rag calibrate`; used unless a policy is given
    calibration: dict[str, Any] = field(default_factory=dict)  # what the recommendation rests on
    documents_digest: str | None = None  # sha256 over the documents read (paths and bytes)
    compile: str = "alone"  # chunk KV compiled alone, or after the chunk before it ("neighbour")
    vector_store: str | None = None  # chroma://host:port/collection; None: FAISS files in storage/

    def write(self, index_dir: str | Path) -> None:
        path = Path(index_dir) / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)


@dataclass
class ReadReport:
    """What `read_documents` read and what it skipped (relative path -> reason)."""

    documents: list[Document]
    skipped: dict[str, str] = field(default_factory=dict)
    digest: str = ""  # sha256 over every file's path and bytes: changes when any document does

    def summary(self) -> str:
        line = f"read {len(self.documents)} document(s)"
        if self.skipped:
            line += f", skipped {len(self.skipped)}: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return line


def _file_readers() -> dict[str, Any]:
    """LlamaIndex's readers for the formats that are not plain text (suffix -> reader)."""
    from llama_index.readers.file import DocxReader, HTMLTagReader, PDFReader

    pdf, html = PDFReader(return_full_document=True), HTMLTagReader(tag="body")
    return {".pdf": pdf, ".docx": DocxReader(), ".html": html, ".htm": html}


def _read_one(path: Path, raw: bytes, readers: dict[str, Any]) -> str:
    """The text of one file (`raw`: its bytes); raises ValueError with the reason when it has none."""
    reader = readers.get(path.suffix.lower())
    if reader is None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("not text: a binary file of a format epic-rag does not read") from None
    try:
        parts = reader.load_data(path)
    except Exception as err:  # each reader fails its own way on a damaged file; report it and go on
        raise ValueError(f"{path.suffix.lstrip('.').upper()} unreadable: {type(err).__name__}: {err}") from None
    return "\n\n".join(d.text for d in parts if d.text.strip())


def read_documents(docs_dir: str | Path, strict: bool = False, progress: bool = False) -> ReadReport:
    """Every readable file under `docs_dir` as a Document: text and Markdown as they are, PDF,
    DOCX and HTML through LlamaIndex's readers. A file that cannot be read (or holds no
    text) is skipped with a warning naming it and why, or refused with `strict`."""
    root = Path(docs_dir)
    if not root.exists():
        raise FileNotFoundError(f"documents folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass the folder that holds your documents")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    if not files:
        raise ValueError(f"documents folder {root} is empty: put some documents (.txt, .md, .pdf, .docx, .html) in it")
    readers = _file_readers()
    report = ReadReport([])
    digest = hashlib.sha256()
    for path in tqdm(files, desc="reading documents", unit="file", disable=not progress):
        rel = path.relative_to(root).as_posix()
        try:
            raw = path.read_bytes()
            digest.update(f"{rel}\0{len(raw)}\0".encode())
            digest.update(raw)
            text = _read_one(path, raw, readers)
        except ValueError as err:
            report.skipped[rel] = str(err)
            continue
        except OSError as err:
            report.skipped[rel] = err.strerror or str(err)
            continue
        if not text.strip():
            report.skipped[rel] = "no text in it (empty, or a scanned PDF without a text layer)"
            continue
        report.documents.append(Document(text=text, id_=rel, metadata={"file_name": rel}))
    report.digest = digest.hexdigest()
    if report.skipped and strict:
        raise ValueError(f"--strict: cannot read {len(report.skipped)} file(s) in {root}: " + report.summary())
    if report.skipped:
        logger.warning("skipping %d file(s) in %s: %s", len(report.skipped), root, report.summary())
    if not report.documents:
        raise ValueError(f"documents folder {root} holds no readable text: " + report.summary())
    return report


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") or part in SKIP_DIRS for part in rel.parts)


def use_settings(llm: EpicLLM, embed: SentenceTransformerEmbedding) -> None:
    """Point LlamaIndex's global settings at our LLM, embedder and the LLM's own tokenizer."""
    tokenizer = llm.engine.tokenizer
    Settings.llm = llm
    Settings.embed_model = embed
    Settings.tokenizer = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]


class RagApp:
    """An opened index: the engine, its LLM, the postprocessor and the LlamaIndex index."""

    def __init__(
        self,
        index: VectorStoreIndex,
        llm: EpicLLM,
        embed: SentenceTransformerEmbedding,
        top_k: int = 3,
        order: str = "retrieval",
    ) -> None:
        self.index, self.llm, self.embed, self.top_k = index, llm, embed, top_k
        self.postprocessor = EpicKVPostprocessor(llm.engine, order=order)
        use_settings(llm, embed)

    @property
    def engine(self) -> EpicEngine:
        return self.llm.engine

    def query_engine(self, response_mode: str = "compact", streaming: bool = False, **kwargs: Any):
        """A query engine whose prompt keeps answers to the context and says so when it lacks them."""
        kwargs.setdefault("text_qa_template", QA_PROMPT)
        kwargs.setdefault("refine_template", REFINE_PROMPT)
        return self.index.as_query_engine(
            llm=self.llm,
            similarity_top_k=self.top_k,
            node_postprocessors=[self.postprocessor],
            response_mode=response_mode,
            streaming=streaming,
            **kwargs,
        )

    def chat_engine(
        self,
        retrieval: str = "latest",
        history_tokens: int = HISTORY_TOKENS,
        extra_system: str | None = None,
        **kwargs: Any,
    ):
        """A chat engine with bounded memory; each turn retrieves and the context leads its prompt.

        `retrieval`: "latest" retrieves on the user's latest message; "condense" first has the
        model rewrite it, with the history, into a standalone question (one more LLM call per
        follow-up). `history_tokens` bounds the earlier turns kept in the prompt: they are
        recomputed every turn, so they cost time and crowd the window. `extra_system`: the
        caller's own instructions, after ours."""
        if retrieval not in CHAT_RETRIEVAL:
            raise ValueError(f"unknown chat retrieval {retrieval!r}: use one of {', '.join(CHAT_RETRIEVAL)}")
        if history_tokens < 0:
            raise ValueError(f"history_tokens must be >= 0, got {history_tokens}")
        common = {
            "retriever": self.index.as_retriever(similarity_top_k=self.top_k),
            "llm": self.llm,
            "memory": BoundedHistory.from_defaults(history_tokens, Settings.tokenizer),
            "system_prompt": CHAT_SYSTEM_PROMPT + (f"\n{extra_system.strip()}" if extra_system else ""),
            "node_postprocessors": [self.postprocessor],
        }
        if retrieval == "condense":
            return CondensingChatEngine.from_defaults(
                context_prompt=CHAT_CONTEXT_TEMPLATE,
                context_refine_prompt=CHAT_REFINE_TEMPLATE,
                **common,
                **kwargs,
            )
        return ContextChatEngine.from_defaults(
            context_template=CHAT_CONTEXT_TEMPLATE,
            context_refine_template=CHAT_REFINE_TEMPLATE,
            **common,
            **kwargs,
        )

    def ask(self, question: str, response_mode: str = "compact") -> tuple[Any, Handoff | None]:
        """(LlamaIndex response, this query's handoff with hit/miss counts and per-call stats)."""
        response = self.query_engine(response_mode=response_mode).query(question)
        return response, current_handoff()


class CondensingChatEngine(CondensePlusContextChatEngine):
    """Condense-then-retrieve chat that keeps what the condense step asked and cost.

    `condensed` is the standalone question the latest turn retrieved on; `condense_call` the
    report of the model call that wrote it (None when the turn had no history to condense)."""

    condensed: str | None = None
    condense_call: CallReport | None = None

    def _condense_question(self, chat_history: list[ChatMessage], latest_message: str) -> str:
        set_handoff(None)  # the condense call links no chunks; its report must not land in another query's
        self.condensed = super()._condense_question(chat_history, latest_message).strip() or latest_message
        self.condense_call = last_call() if chat_history else None
        return self.condensed


def build_index(
    docs_dir: str | Path,
    index_dir: str | Path,
    model: str = DEFAULT_MODEL,
    engine: EpicEngine | None = None,
    show_progress: bool = True,
    parser_kwargs: dict[str, Any] | None = None,
    strict: bool = False,
    documents: ReadReport | None = None,
    compile: str = "alone",
    kv_url: str | None = None,
    kv_ttl_s: int | None = None,
    vector_store: str | None = None,
    **app_kwargs: Any,
) -> RagApp:
    """Read, split, precompute KV, embed, and persist; returns the opened app (`strict`: refuse a
    folder with an unreadable file instead of skipping it; `documents`: the folder already read;
    `compile`: "alone" or "neighbour", each chunk's KV compiled after the chunk before it;
    `kv_url`: a Redis server that gets every chunk's KV too, for replicas; it must answer;
    `vector_store`: ``chroma://host:port/collection`` keeps nodes and vectors in that Chroma
    collection, whose previous content this build replaces, instead of FAISS files)."""
    if vector_store is not None:
        parse_chroma_url(vector_store)  # a malformed URL fails before the model loads
    if compile not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {compile!r}; choose one of {', '.join(COMPILE_MODES)}")
    report = documents or read_documents(docs_dir, strict=strict, progress=show_progress)
    docs = report.documents
    index_dir = Path(index_dir)
    engine = engine or EpicEngine.from_pretrained(
        model, store_dir=index_dir / "kv", kv_url=kv_url, kv_ttl_s=kv_ttl_s, require_kv_url=True
    )
    llm, embed = EpicLLM(engine, model_name=model), SentenceTransformerEmbedding()
    use_settings(llm, embed)
    parser_kwargs = {"target_tokens": 256, "max_tokens": 384, "min_tokens": 48, **(parser_kwargs or {})}
    parser = KVSplitNodeParser.from_engine(engine, **parser_kwargs)
    shared = chroma_vector_store(vector_store, replace=True) if vector_store else None
    storage = StorageContext.from_defaults(vector_store=shared or _faiss_store(embed))
    index = VectorStoreIndex.from_documents(
        docs,
        storage_context=storage,
        embed_model=embed,
        transformations=[
            parser,
            EpicKVPrecompute(engine, show_progress=show_progress, neighbour_context=compile == "neighbour"),
        ],
        show_progress=show_progress,
    )
    if shared is None:
        _persist_atomically(storage, index_dir / "storage")
    else:
        index_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(index_dir / "storage", ignore_errors=True)  # an older FAISS build of this folder
    manifest = IndexManifest(
        model,
        engine.fingerprint,
        DEFAULT_EMBED_MODEL,
        len(docs),
        node_count(shared) if shared is not None else len(index.docstore.docs),
        parser_kwargs,
        documents_digest=report.digest,
        compile=compile,
        vector_store=vector_store,
    )
    manifest.write(index_dir)
    return RagApp(index, llm, embed, **app_kwargs)


def index_is_current(index_dir: str | Path, documents: ReadReport, model: str) -> bool:
    """True when `index_dir` holds an index of exactly these documents built with `model`."""
    if not (Path(index_dir) / MANIFEST).is_file():
        return False
    manifest = read_manifest(index_dir)
    return manifest.documents_digest == documents.digest and _same_model(manifest.model) == _same_model(model)


def _persist_atomically(storage: StorageContext, folder: Path) -> None:
    """Persist into a fresh sibling folder, then swap it in: an interrupted build leaves the
    previous index whole (and a leftover from one is cleared on the next)."""
    fresh, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    for leftover in (fresh, old):
        shutil.rmtree(leftover, ignore_errors=True)
    storage.persist(persist_dir=str(fresh))
    if folder.exists():
        os.replace(folder, old)
    os.replace(fresh, folder)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(index_dir: str | Path) -> IndexManifest:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{index_dir} is not an epic-rag index (no {MANIFEST}); build one with `epic-rag index`"
        )
    return IndexManifest(**json.loads(path.read_text()))


def open_index(
    index_dir: str | Path,
    model: str | None = None,
    engine: EpicEngine | None = None,
    policy: str | RecomputePolicy | None = None,
    max_new_tokens: int = 256,
    kv_url: str | None = None,
    kv_ttl_s: int | None = None,
    kv_memory_bytes: int = 2 << 30,
    local_kv: bool = True,
    **app_kwargs: Any,
) -> RagApp:
    """Reopen a persisted index with the model that built it (refuses another model).

    The policy is `policy` when given, else the one `epic-rag calibrate` recorded for this
    index, else the engine's default policy. With `kv_url`, chunk KV missing from the
    index's own kv/ folder is read from (and written to) that Redis server; the app keeps
    answering while it is down. `kv_memory_bytes` bounds the in-process tier; without
    `local_kv` the kv/ folder is not used (a replica that relies on Redis alone)."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if model is not None and _same_model(model) != _same_model(manifest.model):
        raise ValueError(
            f"index {index_dir} was built with model {manifest.model!r}, not {model!r}: "
            f"use --model {manifest.model} (or leave --model out), or build an index for {model!r} with "
            f"`epic-rag index DOCS_DIR --index NEW_DIR --model {model}`"
        )
    engine = engine or EpicEngine.from_pretrained(
        manifest.model,
        store_dir=index_dir / "kv" if local_kv else None,
        memory_budget=kv_memory_bytes,
        kv_url=kv_url,
        kv_ttl_s=kv_ttl_s,
        progress_tokens=LONG_PREFILL_TOKENS,
    )
    if engine.fingerprint != manifest.fingerprint:
        raise ValueError(
            f"index {index_dir} was built with other weights than the loaded {manifest.model!r} "
            f"(fingerprint {manifest.fingerprint[:12]} vs {engine.fingerprint[:12]}); rebuild the index"
        )
    embed = SentenceTransformerEmbedding()
    policy = policy or manifest.policy or engine.default_policy
    llm = EpicLLM(engine, model_name=manifest.model, policy=policy, max_new_tokens=max_new_tokens)
    use_settings(llm, embed)
    if manifest.vector_store:
        index = VectorStoreIndex.from_vector_store(chroma_vector_store(manifest.vector_store), embed_model=embed)
        return RagApp(index, llm, embed, **app_kwargs)
    from llama_index.vector_stores.faiss import FaissVectorStore

    storage_dir = str(index_dir / "storage")
    storage = StorageContext.from_defaults(
        vector_store=FaissVectorStore.from_persist_dir(storage_dir), persist_dir=storage_dir
    )
    index = load_index_from_storage(storage, embed_model=embed)
    return RagApp(index, llm, embed, **app_kwargs)


def calibration_samples(app: RagApp, n: int, seed: int = 0) -> list[Sample]:
    """`n` questions written from random chunks of the index, each with the chunks the app's
    retriever returns for it (in retrieval order): chunk sets as real queries meet them."""
    rng = random.Random(seed)
    stored = app.index.docstore.docs.values() or app.index.vector_store.get_nodes(None)  # FAISS or Chroma
    nodes = sorted(stored, key=lambda n: n.node_id)
    retriever = app.index.as_retriever(similarity_top_k=app.top_k)
    samples = []
    for node in rng.sample(nodes, min(n, len(nodes))):
        question = question_from(node.get_content(), rng)
        texts = [t for t in (llm_text(r.node) for r in retriever.retrieve(question)) if t]
        samples.append(Sample(question, texts))
    return samples


def question_from(text: str, rng: random.Random) -> str:
    """A question about one sentence of `text`: "What does the text say about <its first words>?"."""
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", text)]
    long = [s for s in sentences if len(s) >= 6] or [text.split()]
    words = " ".join(w.strip(".,;:!?()[]\"'") for w in rng.choice(long)[:8])
    return f"What does the text say about {words}?"


def calibrate_index(
    index_dir: str | Path,
    samples: int = 12,
    candidates: Sequence[str] = CANDIDATES,
    max_new_tokens: int = 16,
    seed: int = 0,
    engine: EpicEngine | None = None,
) -> tuple[list[PolicyScore], str]:
    """Measure `candidates` on chunk sets of this index and record the recommended policy in
    its manifest; returns (scores, recommended)."""
    app = open_index(index_dir, engine=engine)
    scores = calibrate(app.engine, calibration_samples(app, samples, seed), candidates, max_new_tokens=max_new_tokens)
    best = recommend(scores)
    manifest = read_manifest(index_dir)
    manifest.policy = best
    manifest.calibration = {
        "rule": "lowest teacher-forced KL to full recompute at <= 1.5x AttnLink(16)'s TTFT",
        "samples": samples,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scores": [s.as_dict() for s in scores],
    }
    manifest.write(index_dir)
    return scores, best


def _same_model(spec: str) -> str:
    """A model spec with built-in aliases resolved, for comparing what built an index."""
    return builtin_name(spec) or spec


def _faiss_store(embed: SentenceTransformerEmbedding):
    import faiss
    from llama_index.vector_stores.faiss import FaissVectorStore

    dim = len(embed.get_text_embedding("dimension probe"))
    return FaissVectorStore(faiss_index=faiss.IndexFlatIP(dim))
