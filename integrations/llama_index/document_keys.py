"""Which chunk KV entries each source document's nodes use, kept beside an ingestion docstore.

An `IngestionPipeline` with a docstore replaces a changed document's nodes and, under
``UPSERTS_AND_DELETE``, removes those of a document that left the input; the precompute
hook sees only the new nodes. This record lets it drop what the old ones used: per
source document, the store keys its nodes referenced, in a collection of the docstore's
own key-value store (so it persists, and moves, with the docstore).
"""

from __future__ import annotations

from collections.abc import Iterable

from llama_index.core.storage.docstore.keyval_docstore import KVDocumentStore

COLLECTION = "epic_rag/document_kv_keys"


class DocumentKeys:
    """Document id -> the KV store keys its nodes use, in `docstore`'s key-value store."""

    def __init__(self, docstore: KVDocumentStore) -> None:
        if not isinstance(docstore, KVDocumentStore):
            raise TypeError(
                f"EpicKVPrecompute(docstore=...) needs a LlamaIndex key-value docstore (SimpleDocumentStore, "
                f"RedisDocumentStore, ...), got {type(docstore).__name__}"
            )
        self._docstore = docstore
        self._kv = docstore._kvstore  # every KVDocumentStore keeps its collections here; ours is one more

    def all(self) -> dict[str, set[str]]:
        """Every recorded document with its keys."""
        return {doc_id: set(value["keys"]) for doc_id, value in self._kv.get_all(collection=COLLECTION).items()}

    def replace(self, keys_by_document: dict[str, set[str]]) -> set[str]:
        """Record the keys of these documents' new nodes; returns the keys that no recorded
        document uses any more: those of their old nodes, and of every recorded document that
        left the docstore (removed from the pipeline's input)."""
        recorded = self.all()
        present = set(self._docstore.get_all_document_hashes().values()) | set(keys_by_document)
        left = [doc_id for doc_id in recorded if doc_id not in present]
        for doc_id in left:
            self._kv.delete(doc_id, collection=COLLECTION)
        for doc_id, keys in keys_by_document.items():
            self._kv.put(doc_id, {"keys": sorted(keys)}, collection=COLLECTION)
        now = {doc_id: keys for doc_id, keys in recorded.items() if doc_id in present} | keys_by_document
        return _union(recorded.values()) - _union(now.values())


def _union(sets: Iterable[set[str]]) -> set[str]:
    out: set[str] = set()
    for s in sets:
        out |= s
    return out
