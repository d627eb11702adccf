"""What keeping an index current costs: an update after one document changed, was added or was
removed, against building the whole index again.

The corpus folder's own files (not its subfolders: the stdlib corpus keeps its licence in
_meta/) are copied to a scratch folder and indexed once (timed: read, split, embed,
compile, persist). Then, in turn on that index, the median-sized document gets one
sentence appended, a new document appears (that document's sentences in reverse order:
new chunks, realistic text), and the changed document is removed; each update is timed as
`epic-rag index` runs it on an existing index (read the folder, compare hashes, process
what changed, write, delete unused KV). The model loads once, so both sides exclude it.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
import time
from pathlib import Path

from epic_rag.app.documents import read_documents
from epic_rag.app.index import build_index
from epic_rag.app.updating import UpdateReport

from epic_rag import EpicEngine
from epic_rag.offline import DEFAULT_MODEL
from epic_rag.store import KVStore

from .accuracy import machine
from .devices import add_device_arguments, resolve_device_arguments
from .output import write_result


def median_document(folder: Path) -> Path:
    """The document of middle size (ties: by name), the one each update touches."""
    files = sorted((p for p in folder.rglob("*") if p.is_file()), key=lambda p: (p.stat().st_size, p.name))
    return files[len(files) // 2]


def measure(engine: EpicEngine, corpus: Path, scratch: Path) -> tuple[list[dict], int]:
    """(rows: the full build, then each update on the index it left; the chunks of the full build)."""
    docs, index_dir = scratch / "docs", scratch / "index"
    docs.mkdir()
    for path in (p for p in corpus.iterdir() if p.is_file()):
        shutil.copy(path, docs)
    start = time.perf_counter()
    app = build_index(docs, index_dir, engine=engine, show_progress=False)
    full = time.perf_counter() - start
    chunks = len(app.index.index_struct.nodes_dict)
    rows = [{"update": "full build", "seconds": full, "compiled": engine.store.stats().misses, "reused": 0}]
    target = median_document(docs)
    text = target.read_text(encoding="utf-8")
    steps = [
        ("1 changed", lambda: target.write_text(text + "\n\nThis paragraph was added by the update benchmark.\n")),
        ("1 added", lambda: (docs / "zz-added.md").write_text(_reversed_sentences(text), encoding="utf-8")),
        ("1 removed", target.unlink),
        ("nothing changed", lambda: None),
    ]
    for name, change in steps:
        change()
        start = time.perf_counter()
        report: UpdateReport = app.refresh(docs, documents=read_documents(docs))
        seconds = time.perf_counter() - start
        rows.append({"update": name, "seconds": seconds, "compiled": report.compiled, "reused": report.reused,
                     "summary": report.summary(), "kv_deleted": report.kv_deleted})  # fmt: skip
    for row in rows:
        row["vs_full"] = row["seconds"] / full
    return rows, chunks


def _reversed_sentences(text: str) -> str:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    return " ".join(reversed(sentences)) + "\n"


def format_table(result: dict) -> str:
    head = (
        f"{result['corpus']}: {result['documents']} documents, {result['chunks']} chunks; model {result['model']} "
        f"({result['machine']}); model load excluded\n\n"
        "| update | seconds | x full build | chunks compiled | reused |\n|---|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r['update']} | {r['seconds']:.1f} | {r['vs_full']:.2f} | {r['compiled']} | {r['reused']} |"
        for r in result["rows"]
    ]
    return head + "\n".join(rows) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", type=Path, required=True, help="documents folder (copied; never changed)")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name, folder or .gguf")
    add_device_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("bench-reindex"), help="folder for results.json")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    resolve_device_arguments(args)
    with tempfile.TemporaryDirectory(prefix="epic-rag-reindex-") as scratch:
        engine = EpicEngine.from_pretrained(
            args.model, store=KVStore(Path(scratch) / "index" / "kv"), device=args.device, dtype=args.dtype
        )
        rows, chunks = measure(engine, args.corpus, Path(scratch))
    result = {
        "model": args.model,
        "machine": machine(),
        "corpus": args.corpus.name,
        "documents": sum(1 for p in args.corpus.iterdir() if p.is_file()),
        "chunks": chunks,
        "rows": rows,
    }
    write_result(args.out, result, format_table(result))
    return 0
