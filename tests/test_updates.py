"""Documents change: an index updated in place processes only what was added, changed or removed,
its answers follow, its unused KV files go, an interrupted update leaves the previous index
answering, a running server picks the update up, and the ingestion hook's cache and docstore
record follow the model and the documents. Real files, real FAISS and Chroma, real servers."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from epic_rag.app.index import build_index, open_index
from epic_rag.app.manifest import read_manifest
from epic_rag.integrations.llama_index.handoff import CONTEXT_KEY, KV_KEY
from epic_rag.server.process import ServeProcess
from llama_index.core import Document

from epic_rag import KVStore

from .conftest import SAMPLE_DOCS, SMOLLM2, smollm2_over
from .live_servers import ChromaServer
from .test_cli_rag import ENV, epic_rag, kv_keys, node_keys, stats_line

pytestmark = pytest.mark.slow
CEO = "Who has been the chief executive of Norrvik since 2019?"
CRATE = "How much does the Skylark S3 shipping crate weigh?"
CRATE_DOC = "# Shipping\n\nThe Skylark S3 ships in a blue wooden crate that weighs 41 kilograms when packed.\n"
FIVE_YEARS = ("three-year warranty", "five-year warranty")


def edit_docs(docs: Path) -> None:
    """One document added, one changed, one removed (the three kinds of change at once)."""
    (docs / "shipping.md").write_text(CRATE_DOC)
    support = docs / "support.md"
    support.write_text(support.read_text().replace(*FIVE_YEARS))
    (docs / "company.md").unlink()


def ask(app, question: str) -> tuple[str, list[str]]:
    """(answer text, the files of its sources)."""
    response, _ = app.ask(question)
    return str(response).strip(), [n.node.metadata["file_name"] for n in response.source_nodes]


def test_an_update_processes_only_what_changed_and_answers_follow(smollm2, tmp_path):
    docs, folder = tmp_path / "docs", tmp_path / "idx"
    shutil.copytree(SAMPLE_DOCS, docs)
    engine = smollm2_over(smollm2, KVStore(folder / "kv"))
    app = build_index(docs, folder, model=SMOLLM2, engine=engine, show_progress=False)
    app.llm.max_new_tokens = 24
    before_answer, before_sources = ask(app, CEO)
    assert "Tomas Eide" in before_answer and "company.md" in before_sources
    nodes_before = {n.ref_doc_id: n.metadata[KV_KEY] for n in app.index.docstore.docs.values()}
    kv_before = {k: (folder / "kv" / k[:2] / f"{k}.safetensors").stat().st_mtime_ns for k in kv_keys(folder)}
    sizes = {k: (folder / "kv" / k[:2] / f"{k}.safetensors").stat().st_size for k in kv_keys(folder)}
    misses = engine.store.stats().misses

    edit_docs(docs)
    report = app.refresh(docs)
    assert (report.added, report.changed, report.removed, report.unchanged) == (1, 1, 1, 2)
    assert (report.compiled, report.reused) == (2, 0) == (engine.store.stats().misses - misses, 0)
    assert report.summary() == "1 added, 1 changed, 1 removed, 2 unchanged; 2 chunks compiled, 0 reused"

    nodes_after = {n.ref_doc_id: n.metadata[KV_KEY] for n in app.index.docstore.docs.values()}
    assert sorted(nodes_after) == ["firmware.md", "shipping.md", "skylark_s3.md", "support.md"]
    assert app.index.vector_store.client.ntotal == len(app.index.index_struct.nodes_dict) == 4
    manifest = read_manifest(folder)
    assert (manifest.documents, manifest.nodes, manifest.generation) == (4, 4, 2)
    assert sorted(manifest.document_hashes) == sorted(nodes_after)
    for doc_id, doc_hash in manifest.document_hashes.items():  # LlamaIndex's own refresh_ref_docs sees the same
        assert app.index.docstore.get_document_hash(doc_id) == doc_hash
    for doc in ("firmware.md", "skylark_s3.md"):  # unchanged: the same entry, its file never rewritten
        key = nodes_after[doc]
        assert (
            key == nodes_before[doc]
            and kv_before[key] == (folder / "kv" / key[:2] / f"{key}.safetensors").stat().st_mtime_ns
        )
    gone = {nodes_before["company.md"], nodes_before["support.md"]}
    assert not gone & kv_keys(folder) and report.kv_deleted == 2 and report.bytes_freed == sum(sizes[k] for k in gone)
    assert node_keys(folder) <= kv_keys(folder)

    reopened = open_index(folder, engine=engine, max_new_tokens=24)  # what a new process sees
    assert "41" in ask(reopened, CRATE)[0]
    warranty = reopened.index.as_retriever(similarity_top_k=1).retrieve("How long is the warranty on a Skylark buoy?")
    assert FIVE_YEARS[1] in warranty[0].node.get_content() and FIVE_YEARS[0] not in warranty[0].node.get_content()
    answer, sources = ask(reopened, CEO)
    assert "Tomas Eide" not in answer and "company.md" not in sources
    for index in (app.index, reopened.index):  # LlamaIndex's own insert splits and compiles as `index` does
        index.insert(Document(text=CRATE_DOC.replace("41", "43"), id_=f"note-{id(index)}.md"))
        node = next(n for n in index.docstore.docs.values() if n.ref_doc_id == f"note-{id(index)}.md")
        assert engine.store.contains(node.metadata[KV_KEY])


def test_an_unchanged_folder_is_a_no_op_and_insert_and_delete_name_documents(smollm2, tmp_path):
    folder = tmp_path / "idx"
    engine = smollm2_over(smollm2, KVStore(folder / "kv"))
    app = build_index(SAMPLE_DOCS, folder, model=SMOLLM2, engine=engine, show_progress=False)
    assert (
        app.refresh(SAMPLE_DOCS).summary() == "0 added, 0 changed, 0 removed, 4 unchanged; 0 chunks compiled, 0 reused"
    )
    assert read_manifest(folder).generation == 1  # nothing written

    inserted = app.insert([Document(text=CRATE_DOC, id_="shipping.md", metadata={"file_name": "shipping.md"})])
    assert (inserted.added, inserted.compiled) == (1, 1) and read_manifest(folder).nodes == 5
    deleted = app.delete(str(tmp_path / "anywhere" / "company.md"))  # a path ending with the document's id
    assert (deleted.removed, deleted.kv_deleted) == (1, 1) and read_manifest(folder).documents == 4
    with pytest.raises(ValueError, match="names no document of this index; give its id, one of: firmware.md"):
        app.delete("company.md")
    assert read_manifest(folder).generation == 3


def test_similar_compile_recompiles_exactly_the_nodes_whose_neighbours_changed(smollm2, tmp_path):
    docs, folder = tmp_path / "docs", tmp_path / "idx"
    shutil.copytree(SAMPLE_DOCS, docs)
    engine = smollm2_over(smollm2, KVStore(folder / "kv"))
    app = build_index(docs, folder, model=SMOLLM2, engine=engine, show_progress=False, compile="similar:2")
    before = {n.ref_doc_id: (n.metadata[CONTEXT_KEY], n.metadata[KV_KEY]) for n in app.index.docstore.docs.values()}
    leaving = {n.node_id for n in app.index.docstore.docs.values() if n.ref_doc_id in ("company.md", "support.md")}
    stored = set(engine.store.keys())
    edit_docs(docs)  # company.md and the old support.md leave every context they were in
    report = app.refresh(docs)
    nodes = list(app.index.docstore.docs.values())
    ids = {n.node_id for n in nodes}
    kept = [n for n in nodes if n.ref_doc_id in ("firmware.md", "skylark_s3.md")]
    for node in nodes:
        context = node.metadata[CONTEXT_KEY].split(",")
        assert len(context) == 2 and set(context) <= ids  # linked after two live nodes
        assert engine.store.contains(node.metadata[KV_KEY])
    for node in kept:  # a new entry exactly when its neighbours changed (kept nodes keep their ids and text)
        old_context, old_key = before[node.ref_doc_id]
        assert (node.metadata[KV_KEY] == old_key) == (node.metadata[CONTEXT_KEY] == old_context)
        # two of its three old neighbours left, so at least one of its two was gone: it must be compiled again
        assert set(old_context.split(",")) & leaving and node.metadata[KV_KEY] != old_key
    assert report.compiled == len(set(engine.store.keys()) - stored)  # every entry computed was a new one


def test_prune_deletes_only_what_no_node_references(sample_index, tmp_path):
    index = tmp_path / "idx"
    shutil.copytree(sample_index, index)
    stale = index / "kv" / "ab" / ("ab" * 32 + ".safetensors")  # an entry no node names, as a rebuild leaves
    stale.parent.mkdir(exist_ok=True)
    shutil.copy(next((index / "kv").glob("*/*.safetensors")), stale)
    nodes = node_keys(index)
    others = kv_keys(index) - nodes  # the stale copy, and any prompt head an earlier test cached
    done = epic_rag("prune", "--index", str(index))
    assert done.returncode == 0, done.stderr
    assert f"pruned {index}: {len(others)} KV files no node references deleted" in done.stdout
    assert f"{len(nodes)} kept" in done.stdout and kv_keys(index) == nodes
    asked = epic_rag(
        "ask", "How long does the Skylark S3 battery last?", "--index", str(index), "--max-new-tokens", "4"
    )
    assert stats_line(asked.stdout) == "chunks: 3 linked (3 hits, 0 misses) | prompt head: computed"


def test_the_cli_updates_in_place_and_rebuilds_when_asked_or_when_options_change(tmp_path):
    docs, index = tmp_path / "docs", tmp_path / "idx"
    shutil.copytree(SAMPLE_DOCS, docs)
    assert epic_rag("index", str(docs), "--index", str(index), "--model", SMOLLM2).returncode == 0
    support = docs / "support.md"
    support.write_text(support.read_text().replace(*FIVE_YEARS))
    done = epic_rag("index", str(docs), "--index", str(index))  # the model is the index's
    assert done.returncode == 0, done.stderr
    assert "0 added, 1 changed, 0 removed, 3 unchanged; 1 chunks compiled, 0 reused" in done.stdout
    assert f"updated {index} in " in done.stdout and "(generation 2); 1 unused KV files deleted" in done.stdout
    same = epic_rag("index", str(docs), "--index", str(index))
    assert "0 added, 0 changed, 0 removed, 4 unchanged; 0 chunks compiled, 0 reused" in same.stdout
    assert f"{index} is up to date (generation 2)" in same.stdout and "Loading weights" not in same.stderr
    rebuilt = epic_rag("index", str(docs), "--index", str(index), "--rebuild")
    assert f"rebuilding {index}: --rebuild" in rebuilt.stdout and f"indexed 4 chunks from {docs}" in rebuilt.stdout
    resized = epic_rag("index", str(docs), "--index", str(index), "--target-tokens", "128")
    assert f"rebuilding {index}: the chunk sizes changed" in resized.stdout
    manifest = json.loads((index / "epic_rag_index.json").read_text())
    assert manifest["chunking"]["target_tokens"] == 128 and manifest["generation"] == 4
    assert manifest["model"] == SMOLLM2


def test_an_interrupted_update_leaves_the_previous_index_answering(tmp_path):
    docs, index = tmp_path / "docs", tmp_path / "idx"
    shutil.copytree(SAMPLE_DOCS, docs)
    assert epic_rag("index", str(docs), "--index", str(index), "--model", SMOLLM2).returncode == 0
    before, storage = kv_keys(index), (index / "storage" / "docstore.json").read_bytes()
    for page in sorted((SAMPLE_DOCS.parent / "stdlib_docs").glob("*.txt"))[:4]:
        shutil.copy(page, docs)  # enough new chunks that the update is still compiling when interrupted
    proc = subprocess.Popen(
        [sys.executable, "-m", "epic_rag.cli", "index", str(docs), "--index", str(index)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's Ctrl-C
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not kv_keys(index) - before:
        time.sleep(0.2)  # interrupt once new chunk KV is being written
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert read_manifest(index).generation == 1 and (index / "storage" / "docstore.json").read_bytes() == storage
    asked = epic_rag(
        "ask", "How long does the Skylark S3 battery last?", "--index", str(index), "--max-new-tokens", "8"
    )
    assert asked.returncode == 0 and "chunks: 3 linked (3 hits, 0 misses)" in asked.stdout
    again = epic_rag("index", str(docs), "--index", str(index))
    assert again.returncode == 0 and "4 added, 0 changed, 0 removed, 4 unchanged" in again.stdout


def test_a_running_server_answers_from_the_updated_index(tmp_path):
    docs, index = tmp_path / "docs", tmp_path / "idx"
    shutil.copytree(SAMPLE_DOCS, docs)
    assert epic_rag("index", str(docs), "--index", str(index), "--model", SMOLLM2).returncode == 0

    def chat(url: str) -> dict:
        body = {"model": "idx", "messages": [{"role": "user", "content": CRATE}], "max_tokens": 24}
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()

    with ServeProcess(index, "--threads", "2", log=tmp_path / "serve.log") as server:
        assert httpx.get(f"{server.url}/health").json()["index_generation"] == 1
        first = chat(server.url)
        assert "shipping.md" not in json.dumps(first["epic_rag"]["sources"])
        (docs / "shipping.md").write_text(CRATE_DOC)
        assert epic_rag("index", str(docs), "--index", str(index)).returncode == 0
        assert httpx.get(f"{server.url}/health", timeout=60).json()["index_generation"] == 2
        second = chat(server.url)
        assert "41" in second["choices"][0]["message"]["content"]
        assert "shipping.md" in [s["file"] for s in second["epic_rag"]["sources"]]


def test_a_chroma_index_is_updated_in_place(smollm2, tmp_path):
    docs, folder = tmp_path / "docs", tmp_path / "idx"
    shutil.copytree(SAMPLE_DOCS, docs)
    server = ChromaServer(tmp_path / "chroma")
    try:
        url = f"chroma://127.0.0.1:{server.port}/docs"
        engine = smollm2_over(smollm2, KVStore(folder / "kv"))
        app = build_index(docs, folder, model=SMOLLM2, engine=engine, show_progress=False, vector_store=url)
        collection = app.index.vector_store.client
        company = collection.get(where={"document_id": "company.md"})["ids"]
        edit_docs(docs)
        report = app.refresh(docs)
        assert report.summary() == "1 added, 1 changed, 1 removed, 2 unchanged; 2 chunks compiled, 0 reused"
        got = collection.get(include=["metadatas"])
        assert collection.count() == read_manifest(folder).nodes == 4 and not set(company) & set(got["ids"])
        assert sorted(m["document_id"] for m in got["metadatas"]) == [
            "firmware.md", "shipping.md", "skylark_s3.md", "support.md"
        ]  # fmt: skip
        replica = open_index(folder, engine=engine, max_new_tokens=24)
        assert "41" in ask(replica, CRATE)[0]
        assert "company.md" not in ask(replica, CEO)[1]
    finally:
        server.stop()


def test_the_precompute_hook_follows_the_model_and_the_documents_in_an_ingestion_pipeline(tmp_path):
    from epic_rag.integrations.llama_index import EpicKVPrecompute, KVSplitNodeParser
    from epic_rag.integrations.llama_index.document_keys import DocumentKeys
    from epic_rag.integrations.llama_index.embeddings import SentenceTransformerEmbedding
    from llama_index.core import Document
    from llama_index.core.ingestion import DocstoreStrategy, IngestionCache, IngestionPipeline
    from llama_index.core.storage.docstore import SimpleDocumentStore
    from llama_index.core.vector_stores import SimpleVectorStore

    from epic_rag import EpicEngine

    from .conftest import CharTokenizer, tiny_model

    embed, docstore, cache = SentenceTransformerEmbedding(), SimpleDocumentStore(), IngestionCache()
    first = EpicEngine(tiny_model("llama", seed=0), CharTokenizer(), KVStore(tmp_path / "a"))
    other = EpicEngine(tiny_model("llama", seed=1), CharTokenizer(), KVStore(tmp_path / "b"))

    def run(engine: EpicEngine, documents: list[Document], store=None) -> None:
        hook = EpicKVPrecompute(engine, embed, docstore=store, show_progress=False)
        parser = KVSplitNodeParser(len, target_tokens=64, max_tokens=96, min_tokens=8)  # CharTokenizer: a char a token
        steps = [parser, hook, embed]
        kwargs = dict(
            docstore=store, vector_store=SimpleVectorStore(), docstore_strategy=DocstoreStrategy.UPSERTS_AND_DELETE
        )
        upserts = kwargs if store is not None else {"cache": cache}  # the docstore runs go uncached
        IngestionPipeline(transformations=steps, disable_cache=store is not None, **upserts).run(documents=documents)

    battery = Document(text="The battery lasts nineteen months at sea.", id_="battery")
    support = Document(text="Support answers on weekdays from eight to four.", id_="support")
    run(first, [battery, support])
    assert len(list(first.store.keys())) == 2
    run(other, [battery, support])  # the cached nodes of the first model must not stand in for this one's
    assert len(list(other.store.keys())) == 2

    tracked = EpicEngine(tiny_model("llama", seed=0), CharTokenizer(), KVStore(tmp_path / "c"))
    run(tracked, [battery, support], docstore)
    old_battery = set(tracked.store.keys())
    run(tracked, [Document(text="The battery lasts twenty months at sea.", id_="battery"), support], docstore)
    assert len(set(tracked.store.keys())) == 2 and len(old_battery - set(tracked.store.keys())) == 1
    run(tracked, [support], docstore)  # the battery document left the input: its entry goes too
    recorded = DocumentKeys(docstore).all()
    assert list(recorded) == ["support"] and set(tracked.store.keys()) == recorded["support"]
