"""Benchmark inputs read in place from the shared evaluation data (never copied)."""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "EPIC_RAG_DATA"
WORKSPACE_DATA = Path("/work/shared/data")


def default_data_dir() -> Path:
    """``$EPIC_RAG_DATA``; else a ``shared/data`` folder beside the checkout or above it;
    else the workspace's ``/work/shared/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return WORKSPACE_DATA


def essay_chunks(engine, n: int, tokens: int, folder: Path | None = None) -> list[str]:
    """`n` chunk texts of about `tokens` tokens each, one per essay, cut at a token boundary."""
    folder = Path(folder) if folder is not None else default_data_dir() / "haystack"
    files = sorted(folder.glob("*.txt"))
    if len(files) < n:
        raise FileNotFoundError(f"need {n} essays under {folder}, found {len(files)}; pass --essays DIR")
    out = []
    for path in files[:n]:
        ids = engine.tokenize(path.read_text(encoding="utf-8", errors="replace"))[:tokens]
        out.append(engine.tokenizer.decode(ids).strip())
    return out
