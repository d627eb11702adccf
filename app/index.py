"""Index folders: building one from documents, reopening it, and the app (RagApp) an opened one is.

An index folder holds ``storage/`` (LlamaIndex docstore + FAISS vectors; absent when the
nodes and vectors live in a Chroma server, see `vector_stores`), ``kv/`` (the
chunk KV store) and ``epic_rag_index.json`` (which model and embedder built it, see
`manifest`). Reopening it loads both; the KV of every node is already in ``kv/``.
Documents are read by `documents`; an index is calibrated by `calibrate`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from epic_rag.integrations.llama_index.embeddings import DEFAULT_EMBED_MODEL, SentenceTransformerEmbedding
from epic_rag.integrations.llama_index.handoff import CallReport, Handoff, current_handoff, set_handoff
from epic_rag.integrations.llama_index.llm import EpicLLM, last_call
from epic_rag.integrations.llama_index.node_parser import KVSplitNodeParser
from epic_rag.integrations.llama_index.postprocessor import EpicKVPostprocessor
from epic_rag.integrations.llama_index.precompute import EpicKVPrecompute
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex, load_index_from_storage
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.chat_engine import CondensePlusContextChatEngine, ContextChatEngine

from epic_rag import DEFAULT_MODEL, EpicEngine, KVStore, RecomputePolicy
from epic_rag.compile_spec import DEFAULT_SIMILAR, CompileMode
from epic_rag.devices import dtype_name
from epic_rag.offline import builtin_compile, builtin_name

from .documents import ReadReport, read_documents
from .history import BoundedHistory
from .manifest import MANIFEST, IndexManifest, read_manifest
from .prompts import CHAT_CONTEXT_TEMPLATE, CHAT_REFINE_TEMPLATE, CHAT_SYSTEM_PROMPT, QA_PROMPT, REFINE_PROMPT
from .settings import CHAT_RETRIEVAL, DEFAULT_CHUNKING, HISTORY_TOKENS
from .updating import (
    ChromaTable,
    DocumentChanges,
    FaissTable,
    UpdateReport,
    apply_changes,
    updated_hashes,
    updated_manifest,
)
from .vector_stores import chroma_vector_store, node_count, parse_chroma_url

__all__ = [  # what callers import from here, the modules it draws on included
    "CHAT_RETRIEVAL",
    "HISTORY_TOKENS",
    "MANIFEST",
    "CondensingChatEngine",
    "IndexManifest",
    "RagApp",
    "ReadReport",
    "build_index",
    "index_can_update",
    "index_is_current",
    "open_index",
    "read_documents",
    "read_manifest",
    "use_settings",
]

LONG_PREFILL_TOKENS = 4096  # a prefill computing this many tokens shows a progress bar


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
        index_dir: str | Path | None = None,
    ) -> None:
        """`index_dir`: the folder the index was opened from, which `insert`, `delete` and
        `refresh` keep up to date (None: an index that lives only in this process)."""
        self.index, self.llm, self.embed, self.top_k = index, llm, embed, top_k
        self.index_dir = Path(index_dir) if index_dir is not None else None
        self.postprocessor = EpicKVPostprocessor(llm.engine, order=order)
        use_settings(llm, embed)

    @property
    def engine(self) -> EpicEngine:
        return self.llm.engine

    def insert(self, documents: Sequence[Document], show_progress: bool = False) -> UpdateReport:
        """Add documents, or replace those whose id the index holds with other content, running the
        KVSplit parser and KV precompute as `epic-rag index` does; the index folder is updated."""
        manifest = self._manifest()
        changes = DocumentChanges.between(manifest.document_hashes, list(documents), complete=False)
        return self._update(manifest, changes, None, show_progress)

    def delete(self, document: str) -> UpdateReport:
        """Remove a document, named by its id (its path inside the documents folder, as `epic-rag index`
        records it) or by a path ending with that id; its nodes, vectors and KV files leave the index."""
        manifest = self._manifest()
        known = manifest.document_hashes
        doc_id = document if document in known else _id_of_path(document, known)
        changes = DocumentChanges(removed=[doc_id], unchanged=[k for k in known if k != doc_id])
        return self._update(manifest, changes, None, False)

    def refresh(
        self,
        folder: str | Path,
        strict: bool = False,
        show_progress: bool = False,
        documents: ReadReport | None = None,
    ) -> UpdateReport:
        """Bring the index in line with `folder`: its added, changed and removed documents only
        (`documents`: the folder already read)."""
        report = documents or read_documents(folder, strict=strict, progress=show_progress)
        manifest = self._manifest()
        changes = DocumentChanges.between(manifest.document_hashes, report.documents, complete=True)
        return self._update(manifest, changes, report.digest, show_progress)

    def _manifest(self) -> IndexManifest:
        if self.index_dir is None:
            raise ValueError("this app has no index folder to update: open one with open_index or build_index")
        manifest = read_manifest(self.index_dir)
        if not manifest.document_hashes:
            raise ValueError(
                f"index {self.index_dir} was built before epic-rag kept per-document hashes, so it cannot be "
                f"updated in place: rebuild it once with `epic-rag index DOCS_DIR --index {self.index_dir} --rebuild`"
            )
        return manifest

    def _update(
        self, manifest: IndexManifest, changes: DocumentChanges, digest: str | None, show_progress: bool
    ) -> UpdateReport:
        """Apply `changes` to the index and its folder (`manifest`: its current one); the generation moves on."""
        if not changes:
            return UpdateReport(0, 0, 0, len(changes.unchanged))
        mode = CompileMode.parse(manifest.compile)
        transformations = index_transformations(self.engine, self.embed, manifest.chunking, mode, show_progress)
        if manifest.vector_store:
            table = ChromaTable(self.index)
        else:
            hashes = updated_hashes(manifest, changes)
            table = FaissTable(self.index, self.index_dir / "storage", _faiss_store, hashes, transformations)
        self.index, report, nodes = apply_changes(
            self.engine, table, changes, transformations, self.embed, mode.kind == "similar", show_progress
        )
        updated_manifest(manifest, changes, nodes, digest).write(self.index_dir)
        return report

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
    compile: str | None = None,
    kv_url: str | None = None,
    kv_ttl_s: int | None = None,
    vector_store: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    **app_kwargs: Any,
) -> RagApp:
    """Read, split, precompute KV, embed, and persist; returns the opened app (`strict`: refuse a
    folder with an unreadable file instead of skipping it; `documents`: the folder already read;
    `compile`: "alone", "neighbour" (each chunk's KV compiled after the chunk before it) or
    "similar:N" (after the N chunks most similar to it, linked; see `epic_rag.compile_spec`);
    default: the built-in model's measured default, else "alone";
    `kv_url`: a Redis server that gets every chunk's KV too, for replicas; it must answer;
    `vector_store`: ``chroma://host:port/collection`` keeps nodes and vectors in that Chroma
    collection, whose previous content this build replaces, instead of FAISS files; `device`,
    `dtype`: where and in what precision the model runs, see `epic_rag.devices`)."""
    if vector_store is not None:
        parse_chroma_url(vector_store)  # a malformed URL fails before the model loads
    mode = CompileMode.parse(compile or builtin_compile(str(model)) or "alone")
    report = documents or read_documents(docs_dir, strict=strict, progress=show_progress)
    docs = report.documents
    index_dir = Path(index_dir)
    engine = engine or EpicEngine.from_pretrained(
        model,
        store=KVStore(index_dir / "kv", kv_url=kv_url, kv_ttl_s=kv_ttl_s, require_kv_url=True),
        device=device,
        dtype=dtype,
    )
    llm, embed = EpicLLM(engine, model_name=model), SentenceTransformerEmbedding(device=embed_device(engine))
    use_settings(llm, embed)
    parser_kwargs = {**DEFAULT_CHUNKING, **(parser_kwargs or {})}
    transformations = index_transformations(engine, embed, parser_kwargs, mode, show_progress)
    shared = chroma_vector_store(vector_store, replace=True) if vector_store else None
    storage = StorageContext.from_defaults(vector_store=shared or _faiss_store(embed))
    index = VectorStoreIndex.from_documents(
        docs, storage_context=storage, embed_model=embed, transformations=transformations, show_progress=show_progress
    )
    if shared is None:
        persist_atomically(storage, index_dir / "storage")
    else:
        index_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(index_dir / "storage", ignore_errors=True)  # an older FAISS build of this folder
    manifest = IndexManifest(
        model=model,
        fingerprint=engine.fingerprint,
        fingerprint_scheme=engine.fingerprint_scheme,
        embed_model=DEFAULT_EMBED_MODEL,
        documents=len(docs),
        nodes=node_count(shared) if shared is not None else len(index.docstore.docs),
        chunking=parser_kwargs,
        documents_digest=report.digest,
        compile=str(mode),
        vector_store=vector_store,
        dtype=None if engine.model.dtype == torch.float32 else str(engine.model.dtype).removeprefix("torch."),
        document_hashes={d.id_: d.hash for d in docs},
        generation=_generation(index_dir) + 1,
    )
    manifest.write(index_dir)
    return RagApp(index, llm, embed, index_dir=index_dir, **app_kwargs)


def index_transformations(
    engine: EpicEngine, embed: SentenceTransformerEmbedding, chunking: dict[str, Any], mode: CompileMode, progress: bool
) -> list[Any]:
    """What turns documents into an index's nodes: the KVSplit parser, then the KV precompute hook."""
    parser = KVSplitNodeParser.from_engine(engine, **{**DEFAULT_CHUNKING, **chunking})
    precompute = EpicKVPrecompute(engine, embed, context=mode.kind, n=mode.n or DEFAULT_SIMILAR, show_progress=progress)
    return [parser, precompute]


def _generation(index_dir: Path) -> int:
    """The generation of the index in `index_dir` (0 when there is none, or it does not read)."""
    try:
        return read_manifest(index_dir).generation
    except (FileNotFoundError, ValueError):
        return 0


def embed_device(engine: EpicEngine) -> str:
    """The embedder follows the model's device."""
    return str(engine.device)


def index_is_current(index_dir: str | Path, documents: ReadReport, model: str, compile: str | None = None) -> bool:
    """True when `index_dir` holds an index of exactly these documents built with `model` (and,
    when given, chunk KV compiled in mode `compile`)."""
    if not (Path(index_dir) / MANIFEST).is_file():
        return False
    manifest = read_manifest(index_dir)
    if compile is not None and manifest.compile != str(CompileMode.parse(compile)):
        return False
    return manifest.documents_digest == documents.digest and _same_model(manifest.model) == _same_model(model)


def index_can_update(index_dir: str | Path, model: str) -> bool:
    """True when `index_dir` holds an index built with `model` that can be updated in place
    (it records per-document hashes)."""
    if not (Path(index_dir) / MANIFEST).is_file():
        return False
    manifest = read_manifest(index_dir)
    return bool(manifest.document_hashes) and _same_model(manifest.model) == _same_model(model)


def persist_atomically(storage: StorageContext, folder: Path) -> None:
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


def open_index(
    index_dir: str | Path,
    model: str | None = None,
    engine: EpicEngine | None = None,
    policy: str | RecomputePolicy | None = None,
    max_new_tokens: int = 256,
    kv_url: str | None = None,
    kv_ttl_s: int | None = None,
    kv_memory_bytes: int = 2 << 30,
    kv_disk_bytes: int | None = None,
    local_kv: bool = True,
    manifest: IndexManifest | None = None,
    device: str | None = None,
    dtype: str | None = None,
    **app_kwargs: Any,
) -> RagApp:
    """Reopen a persisted index with the model that built it (refuses another model), on `device`
    (default: the best present) in the dtype the index was built in (another `dtype` is refused:
    its chunk KV would be compiled again, in that dtype, on every first use).

    The policy is `policy` when given, else the one `epic-rag calibrate` recorded for this
    index, else the engine's default policy. With `kv_url`, chunk KV missing from the
    index's own kv/ folder is read from (and written to) that Redis server; the app keeps
    answering while it is down. `kv_memory_bytes` bounds the in-process tier, `kv_disk_bytes`
    the kv/ folder (least recently used entries deleted first); without
    `local_kv` the kv/ folder is not used (a replica that relies on Redis alone). `manifest`:
    the one the caller already read from `index_dir` (read here when not given)."""
    index_dir = Path(index_dir)
    manifest = manifest or read_manifest(index_dir)
    if model is not None and _same_model(model) != _same_model(manifest.model):
        raise ValueError(
            f"index {index_dir} was built with model {manifest.model!r}, not {model!r}: "
            f"use --model {manifest.model} (or leave --model out), or build an index for {model!r} with "
            f"`epic-rag index DOCS_DIR --index NEW_DIR --model {model}`"
        )
    built_in = manifest.dtype or "float32"
    if dtype is not None and dtype_name(dtype) != built_in:
        raise ValueError(
            f"index {index_dir} holds chunk KV computed in {built_in}, not {dtype_name(dtype)}: use --dtype {built_in} "
            f"(or leave --dtype out), or build an index in {dtype_name(dtype)} with `epic-rag index DOCS_DIR --index "
            f"NEW_DIR --dtype {dtype_name(dtype)}`"
        )
    engine = engine or EpicEngine.from_pretrained(
        manifest.model,
        store=KVStore(
            index_dir / "kv" if local_kv else None,
            memory_budget=kv_memory_bytes,
            kv_url=kv_url,
            kv_ttl_s=kv_ttl_s,
            disk_budget=kv_disk_bytes,
        ),
        progress_tokens=LONG_PREFILL_TOKENS,
        device=device,
        dtype=built_in,
        fingerprint_scheme=manifest.fingerprint_scheme,
    )
    if engine.fingerprint != manifest.fingerprint:
        device_bound = " (its KV keys were made on the device that built it: open it there)"
        raise ValueError(
            f"index {index_dir} was built with other weights than the loaded {manifest.model!r} "
            f"(fingerprint {manifest.fingerprint[:12]} vs {engine.fingerprint[:12]}"
            f"{device_bound if manifest.fingerprint_scheme == 'float-sum' else ''}); rebuild the index"
        )
    embed = SentenceTransformerEmbedding(device=embed_device(engine))
    policy = policy or manifest.policy or engine.default_policy
    llm = EpicLLM(engine, model_name=manifest.model, policy=policy, max_new_tokens=max_new_tokens)
    use_settings(llm, embed)
    # `index.insert(document)` then splits and compiles as `epic-rag index` does (not LlamaIndex's default splitter)
    steps = index_transformations(engine, embed, manifest.chunking, CompileMode.parse(manifest.compile), False)
    if manifest.vector_store:
        store = chroma_vector_store(manifest.vector_store)
        index = VectorStoreIndex.from_vector_store(store, embed_model=embed, transformations=steps)
    else:
        from llama_index.vector_stores.faiss import FaissVectorStore

        storage_dir = str(index_dir / "storage")
        storage = StorageContext.from_defaults(
            vector_store=FaissVectorStore.from_persist_dir(storage_dir), persist_dir=storage_dir
        )
        index = load_index_from_storage(storage, embed_model=embed, transformations=steps)
    return RagApp(index, llm, embed, index_dir=index_dir, **app_kwargs)


def _same_model(spec: str) -> str:
    """A model spec with built-in aliases resolved, for comparing what built an index."""
    return builtin_name(spec) or spec


def _faiss_store(embed: SentenceTransformerEmbedding):
    import faiss
    from llama_index.vector_stores.faiss import FaissVectorStore

    dim = len(embed.get_text_embedding("dimension probe"))
    return FaissVectorStore(faiss_index=faiss.IndexFlatIP(dim))


def _id_of_path(path: str, known: dict[str, str]) -> str:
    """The document id a path names: the id it ends with (ids are paths inside the documents folder)."""
    posix = Path(path).as_posix()
    matches = [doc_id for doc_id in known if posix == doc_id or posix.endswith("/" + doc_id)]
    if len(matches) != 1:
        raise ValueError(
            f"{path!r} names {'no' if not matches else 'more than one'} document of this index; "
            f"give its id, one of: {', '.join(sorted(known)[:8])}{' ...' if len(known) > 8 else ''}"
        )
    return matches[0]
