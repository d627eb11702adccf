"""Wiring: documents -> KVSplit nodes -> KV store + FAISS index on disk -> query and chat engines.

An index folder holds ``storage/`` (LlamaIndex docstore + FAISS vectors), ``kv/`` (the
chunk KV store) and ``epic_rag_index.json`` (which model and embedder built it).
Reopening it loads both; the KV of every node is already in ``kv/``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex, load_index_from_storage

from epic_rag import DEFAULT_MODEL, DEFAULT_POLICY, EpicEngine, RecomputePolicy
from epic_rag.offline import builtin_name

from .embeddings import DEFAULT_EMBED_MODEL, SentenceTransformerEmbedding
from .handoff import Handoff, current_handoff
from .llm import EpicLLM
from .node_parser import KVSplitNodeParser
from .postprocessor import EpicKVPostprocessor
from .precompute import EpicKVPrecompute

MANIFEST = "epic_rag_index.json"
SKIP_DIRS = {".git", "__pycache__", ".ipynb_checkpoints"}


@dataclass
class IndexManifest:
    """What built an index folder: checked when it is reopened."""

    model: str
    fingerprint: str
    embed_model: str
    documents: int
    nodes: int
    chunking: dict[str, Any] = field(default_factory=dict)


def read_documents(docs_dir: str | Path) -> list[Document]:
    """Every text file under `docs_dir` as a Document; clear errors for what cannot be read."""
    root = Path(docs_dir)
    if not root.exists():
        raise FileNotFoundError(f"documents folder not found: {root}")
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder; pass the folder that holds your documents")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p.relative_to(root)))
    if not files:
        raise ValueError(f"documents folder {root} is empty: put some text files (.txt, .md, ...) in it")
    docs, problems = [], []
    for path in files:
        rel = path.relative_to(root).as_posix()
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            problems.append(f"{rel} (not UTF-8 text)")
            continue
        except OSError as err:
            problems.append(f"{rel} ({err.strerror or err})")
            continue
        if text.strip():
            docs.append(Document(text=text, id_=rel, metadata={"file_name": rel}))
    if problems:
        raise ValueError(f"cannot read {len(problems)} file(s) in {root}: " + "; ".join(problems))
    if not docs:
        raise ValueError(f"documents folder {root} holds no text: every file is empty")
    return docs


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
        return self.index.as_query_engine(
            llm=self.llm,
            similarity_top_k=self.top_k,
            node_postprocessors=[self.postprocessor],
            response_mode=response_mode,
            streaming=streaming,
            **kwargs,
        )

    def chat_engine(self, **kwargs: Any):
        """A chat engine with memory: each turn retrieves, and the context goes into its system prompt."""
        return self.index.as_chat_engine(
            chat_mode="context",
            llm=self.llm,
            similarity_top_k=self.top_k,
            node_postprocessors=[self.postprocessor],
            **kwargs,
        )

    def ask(self, question: str, response_mode: str = "compact") -> tuple[Any, Handoff | None]:
        """(LlamaIndex response, this query's handoff with hit/miss counts and per-call stats)."""
        response = self.query_engine(response_mode=response_mode).query(question)
        return response, current_handoff()


def build_index(
    docs_dir: str | Path,
    index_dir: str | Path,
    model: str = DEFAULT_MODEL,
    engine: EpicEngine | None = None,
    show_progress: bool = True,
    parser_kwargs: dict[str, Any] | None = None,
    **app_kwargs: Any,
) -> RagApp:
    """Read, split, precompute KV, embed, and persist; returns the opened app."""
    docs = read_documents(docs_dir)
    index_dir = Path(index_dir)
    engine = engine or EpicEngine.from_pretrained(model, store_dir=index_dir / "kv")
    llm, embed = EpicLLM(engine, model_name=model), SentenceTransformerEmbedding()
    use_settings(llm, embed)
    parser_kwargs = {"target_tokens": 256, "max_tokens": 384, "min_tokens": 48, **(parser_kwargs or {})}
    parser = KVSplitNodeParser.from_engine(engine, **parser_kwargs)
    storage = StorageContext.from_defaults(vector_store=_faiss_store(embed))
    index = VectorStoreIndex.from_documents(
        docs,
        storage_context=storage,
        embed_model=embed,
        transformations=[parser, EpicKVPrecompute(engine, show_progress=show_progress)],
        show_progress=show_progress,
    )
    storage.persist(persist_dir=str(index_dir / "storage"))
    manifest = IndexManifest(
        model, engine.fingerprint, DEFAULT_EMBED_MODEL, len(docs), len(index.docstore.docs), parser_kwargs
    )
    (index_dir / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2))
    return RagApp(index, llm, embed, **app_kwargs)


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
    policy: str | RecomputePolicy = DEFAULT_POLICY,
    max_new_tokens: int = 256,
    **app_kwargs: Any,
) -> RagApp:
    """Reopen a persisted index with the model that built it (refuses another model)."""
    index_dir = Path(index_dir)
    manifest = read_manifest(index_dir)
    if model is not None and _same_model(model) != _same_model(manifest.model):
        raise ValueError(
            f"index {index_dir} was built with model {manifest.model!r}, not {model!r}: "
            f"ask with --model {manifest.model}, or rebuild it with `epic-rag index ... --model {model}`"
        )
    engine = engine or EpicEngine.from_pretrained(manifest.model, store_dir=index_dir / "kv")
    if engine.fingerprint != manifest.fingerprint:
        raise ValueError(
            f"index {index_dir} was built with other weights than the loaded {manifest.model!r} "
            f"(fingerprint {manifest.fingerprint[:12]} vs {engine.fingerprint[:12]}); rebuild the index"
        )
    from llama_index.vector_stores.faiss import FaissVectorStore

    embed = SentenceTransformerEmbedding()
    llm = EpicLLM(engine, model_name=manifest.model, policy=policy, max_new_tokens=max_new_tokens)
    use_settings(llm, embed)
    storage_dir = str(index_dir / "storage")
    storage = StorageContext.from_defaults(
        vector_store=FaissVectorStore.from_persist_dir(storage_dir), persist_dir=storage_dir
    )
    index = load_index_from_storage(storage, embed_model=embed)
    return RagApp(index, llm, embed, **app_kwargs)


def _same_model(spec: str) -> str:
    """A model spec with built-in aliases resolved, for comparing what built an index."""
    return builtin_name(spec) or spec


def _faiss_store(embed: SentenceTransformerEmbedding):
    import faiss
    from llama_index.vector_stores.faiss import FaissVectorStore

    dim = len(embed.get_text_embedding("dimension probe"))
    return FaissVectorStore(faiss_index=faiss.IndexFlatIP(dim))
