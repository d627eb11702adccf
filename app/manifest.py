"""The index manifest, ``epic_rag_index.json``: which model, embedder and documents built an index folder.

It is checked when the index is reopened (same model, same weights) and records the
policy `epic-rag calibrate` chose. A manifest that does not validate is refused with an
error naming the file and how to fix it, never half-read. This module imports pydantic
only, so the command line can read a manifest before anything heavy loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST = "epic_rag_index.json"


class IndexManifest(BaseModel):
    """What built an index folder (checked when it is reopened) and the policy calibrated on it."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    model: str
    fingerprint: str
    embed_model: str
    documents: int
    nodes: int
    chunking: dict[str, Any] = Field(default_factory=dict)
    policy: str | None = None  # recommended by `epic-rag calibrate`; used unless a policy is given
    calibration: dict[str, Any] = Field(default_factory=dict)  # what the recommendation rests on
    documents_digest: str | None = None  # sha256 over the documents read (paths and bytes)
    compile: str = "alone"  # chunk KV compiled "alone", after its predecessor ("neighbour") or "similar:N"
    vector_store: str | None = None  # chroma://host:port/collection; None: FAISS files in storage/
    dtype: str | None = None  # compute dtype of its chunk KV when not float32 (unwritten then: older readers agree)
    fingerprint_scheme: str = "float-sum"  # how `fingerprint` was computed (see epic_rag.model.fingerprint)
    document_hashes: dict[str, str] = Field(default_factory=dict)  # document id -> LlamaIndex hash, for updates
    generation: int = 0  # +1 at every build or update: a running server reopens the index when it changes

    def write(self, index_dir: str | Path) -> None:
        """Write it into `index_dir` atomically: a reader sees the old manifest or the new one."""
        path = Path(index_dir) / MANIFEST
        tmp = path.with_suffix(".tmp")
        legacy = {"dtype": None, "fingerprint_scheme": "float-sum", "document_hashes": {}, "generation": 0}
        # (fields unwritten at these values, as before they existed, so older readers agree)
        tmp.write_text(self.model_dump_json(indent=2, exclude={k for k, v in legacy.items() if getattr(self, k) == v}))
        os.replace(tmp, path)


def read_manifest(index_dir: str | Path) -> IndexManifest:
    """The manifest of `index_dir`; FileNotFoundError when it is not an index, ValueError when
    the manifest does not validate (both name the folder or file and the command that fixes it)."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{index_dir} is not an epic-rag index (no {MANIFEST}); build one with `epic-rag index`"
        )
    try:
        return IndexManifest.model_validate_json(path.read_bytes())
    except ValidationError as err:
        raise ValueError(
            f"{path} is not a valid epic-rag index manifest ({_problems(err)}); rebuild the index with "
            f"`epic-rag index DOCS_DIR --index {index_dir}`"
        ) from None


def _problems(err: ValidationError) -> str:
    """Each validation error as a short phrase naming the field."""
    phrases = []
    for e in err.errors(include_url=False):
        field = ".".join(str(p) for p in e["loc"])
        if e["type"] == "json_invalid":
            phrases.append(f"not JSON: {e['ctx']['error']}")
        elif e["type"] == "missing":
            phrases.append(f"field {field!r} is missing")
        elif e["type"] == "extra_forbidden":
            phrases.append(f"unknown field {field!r}")
        elif not field:
            phrases.append(e["msg"])
        else:
            got = repr(e["input"])
            phrases.append(f"field {field!r}: {e['msg']}, got {got if len(got) <= 40 else got[:37] + '...'}")
    return "; ".join(phrases)
