"""Nodes and vectors in a real Chroma server on 127.0.0.1: an index built into it is reopened
from its manifest alone (another replica), retrieves and answers like the FAISS default,
re-indexing replaces instead of duplicating, and bad URLs or a stopped server are clear errors."""

from __future__ import annotations

import shutil

import pytest
from epic_rag.app.index import build_index, open_index
from epic_rag.app.manifest import read_manifest
from epic_rag.app.vector_stores import parse_chroma_url

from .live_servers import ChromaServer
from .test_server import SAMPLES, epic_rag

pytestmark = pytest.mark.slow
QUESTION = "What does the Skylark S3 cost?"


def test_chroma_index_reopens_from_its_manifest_and_answers_like_faiss(tmp_path, smollm2):
    server = ChromaServer(tmp_path / "chroma")
    url = f"chroma://127.0.0.1:{server.port}/docs"
    try:
        faiss = build_index(SAMPLES, tmp_path / "faiss", engine=smollm2, show_progress=False, top_k=2)
        build_index(SAMPLES, tmp_path / "built", engine=smollm2, show_progress=False, vector_store=url)
        replica = tmp_path / "replica"  # what another machine gets: the manifest, no storage/ or kv/
        replica.mkdir()
        shutil.copy(tmp_path / "built" / "epic_rag_index.json", replica)
        assert read_manifest(replica).vector_store == url and read_manifest(replica).nodes == 4
        assert not (tmp_path / "built" / "storage").exists()

        shared = open_index(replica, engine=smollm2, max_new_tokens=16, top_k=2)
        want = faiss.index.as_retriever(similarity_top_k=2).retrieve(QUESTION)
        got = shared.index.as_retriever(similarity_top_k=2).retrieve(QUESTION)
        assert [n.node.get_content() for n in got] == [n.node.get_content() for n in want]
        assert all(n.node.metadata.get("epic_rag_kv_key") for n in got)  # the KV keys travelled with the nodes
        faiss_answer = (
            open_index(tmp_path / "faiss", engine=smollm2, max_new_tokens=16, top_k=2).query_engine().query(QUESTION)
        )
        answer = shared.query_engine().query(QUESTION)
        assert str(answer).strip() == str(faiss_answer).strip()

        build_index(SAMPLES, tmp_path / "built", engine=smollm2, show_progress=False, vector_store=url)
        assert read_manifest(tmp_path / "built").nodes == 4  # replaced, not duplicated
        assert len(shared.index.vector_store.get_nodes(None)) == 4
    finally:
        server.stop()
    with pytest.raises(ValueError, match=f"cannot reach the Chroma server at 127.0.0.1:{server.port}.*chroma run"):
        open_index(replica, engine=smollm2)


def test_bad_vector_store_urls_are_refused_before_anything_loads(tmp_path):
    for url in ("http://127.0.0.1:8000/docs", "chroma://127.0.0.1/docs", "chroma://127.0.0.1:8000/", "chroma://h:1/a"):
        with pytest.raises(ValueError, match="chroma://HOST:PORT/COLLECTION"):
            parse_chroma_url(url)
    done = epic_rag("index", str(SAMPLES), "--index", str(tmp_path / "i"), "--vector-store", "chroma://x/docs")
    assert done.returncode == 2 and "chroma://HOST:PORT/COLLECTION" in done.stderr
