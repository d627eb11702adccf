"""Where an index keeps its nodes and vectors: FAISS files in the index folder (one machine),
or a collection of a Chroma server that every replica reaches (`chroma://host:port/name`).

With Chroma, each node's text and metadata (the KV key included) live in the collection
next to its vector, so a replica needs only the index folder's manifest.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

CHROMA_SCHEME = "chroma"
_COLLECTION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")  # Chroma's own naming rule


def parse_chroma_url(url: str) -> tuple[str, int, str]:
    """(host, port, collection) of ``chroma://host:port/collection``; ValueError naming the fix."""
    parts = urlsplit(url)
    collection = parts.path.lstrip("/")
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme != CHROMA_SCHEME or not parts.hostname or port is None or not _COLLECTION.match(collection):
        raise ValueError(
            f"vector store {url!r} is not of the form chroma://HOST:PORT/COLLECTION (a collection name of 3-63 "
            "letters, digits, '.', '_' or '-'), e.g. chroma://127.0.0.1:8001/docs"
        )
    return parts.hostname, port, collection


def chroma_vector_store(url: str, replace: bool = False) -> Any:
    """A LlamaIndex `ChromaVectorStore` on the collection `url` names; with `replace`, the
    collection is emptied first (re-indexing replaces its content, never duplicates it;
    running replicas see the new content without a restart, and no results while it is rebuilt)."""
    try:
        import chromadb
        from llama_index.vector_stores.chroma import ChromaVectorStore
    except ImportError as err:
        raise ValueError(f"a Chroma vector store needs the chroma extra ({err.name} is missing): "
                         "pip install 'epic-rag[chroma]'") from None  # fmt: skip
    host, port, name = parse_chroma_url(url)
    try:
        client = chromadb.HttpClient(host=host, port=port)
        client.heartbeat()
        collection = client.get_or_create_collection(name)
        if replace:  # emptied in place: replicas holding the collection keep a valid handle
            ids = collection.get(include=[])["ids"]
            for start in range(0, len(ids), 1000):
                collection.delete(ids=ids[start : start + 1000])
    except Exception as err:  # chromadb raises its own and httpx's errors for an unreachable server
        raise ValueError(
            f"cannot reach the Chroma server at {host}:{port} ({type(err).__name__}: {err}); start one with "
            f"`chroma run --host {host} --port {port} --path DIR`, or index into FAISS files (leave out --vector-store)"
        ) from None
    return ChromaVectorStore(chroma_collection=collection)


def node_count(vector_store: Any) -> int:
    """Nodes held by a Chroma-backed store."""
    return vector_store.client.count()  # `client` is the Chroma collection
