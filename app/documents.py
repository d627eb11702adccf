"""Reading a documents folder: every readable file as a LlamaIndex Document, what was skipped and why.

Text and Markdown are read as they are; PDF, DOCX and HTML through LlamaIndex's readers.
The digest over every file's path and bytes tells an index whether its documents changed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_index.core import Document
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SKIP_DIRS = {".git", "__pycache__", ".ipynb_checkpoints"}


@dataclass
class ReadReport:
    """What `read_documents` read and what it skipped (relative path -> reason)."""

    documents: list[Document]
    skipped: dict[str, str] = field(default_factory=dict)
    digest: str = ""  # sha256 over every file's path and bytes: changes when any document does

    def summary(self) -> str:
        """One line: how many documents were read, and each skipped file with its reason."""
        line = f"read {len(self.documents)} document(s)"
        if self.skipped:
            line += f", skipped {len(self.skipped)}: " + "; ".join(f"{k} ({v})" for k, v in self.skipped.items())
        return line


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


def _hidden(rel: Path) -> bool:
    """Whether a path inside the folder is hidden (a dot name) or tooling's (`SKIP_DIRS`)."""
    return any(part.startswith(".") or part in SKIP_DIRS for part in rel.parts)
