"""Where the benchmarks' essays come from: a folder named by `--essays`, else by `$EPIC_RAG_DATA`.

The evaluation data (plain-text essays under ``haystack/``, LongBench jsonl files under
``longbench/``) is not part of the project: it is read in place wherever the user keeps it.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "EPIC_RAG_DATA"
HAYSTACK = "haystack"  # the essays' folder inside the data folder


def essay_folder(folder: Path | str | None) -> Path:
    """The folder of .txt essays: `folder` (the `--essays` option) when given, else
    ``$EPIC_RAG_DATA/haystack``; with neither, an error that names both."""
    if folder is not None:
        return Path(folder)
    data = os.environ.get(DATA_ENV)
    if not data:
        raise FileNotFoundError(
            f"no essays to read: pass --essays DIR (a folder of .txt essays) or set {DATA_ENV} "
            f"to a data folder holding {HAYSTACK}/"
        )
    return Path(data) / HAYSTACK


def essay_chunks(engine, n: int, tokens: int, folder: Path) -> list[str]:
    """`n` chunk texts of about `tokens` tokens each, one per essay of `folder`, cut at a token boundary."""
    files = sorted(Path(folder).glob("*.txt"))
    if len(files) < n:
        raise FileNotFoundError(f"need {n} essays under {folder}, found {len(files)}; pass --essays DIR")
    out = []
    for path in files[:n]:
        ids = engine.tokenize(path.read_text(encoding="utf-8", errors="replace"))[:tokens]
        out.append(engine.tokenizer.decode(ids).strip())
    return out
