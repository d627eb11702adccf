"""Calibrating an index: recompute policies measured on its own chunks, the best recorded in its manifest.

Each sample is a question written from a random chunk, with the chunks the index's
retriever returns for it, so the policies meet chunk sets as real queries do.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from pathlib import Path

from epic_rag.integrations.llama_index.handoff import llm_text

from epic_rag import EpicEngine
from epic_rag.calibration import CANDIDATES, PolicyScore, Sample, calibrate, recommend

from .index import RagApp, open_index
from .manifest import IndexManifest, read_manifest


def calibration_samples(app: RagApp, n: int, seed: int = 0) -> list[Sample]:
    """`n` questions written from random chunks of the index, each with the chunks the app's
    retriever returns for it (in retrieval order): chunk sets as real queries meet them."""
    rng = random.Random(seed)
    stored = app.index.docstore.docs.values() or app.index.vector_store.get_nodes(None)  # FAISS or Chroma
    nodes = sorted(stored, key=lambda n: n.node_id)
    retriever = app.index.as_retriever(similarity_top_k=app.top_k)
    samples = []
    for node in rng.sample(nodes, min(n, len(nodes))):
        question = question_from(node.get_content(), rng)
        texts = [t for t in (llm_text(r.node) for r in retriever.retrieve(question)) if t]
        samples.append(Sample(question, texts))
    return samples


def question_from(text: str, rng: random.Random) -> str:
    """A question about one sentence of `text`: "What does the text say about <its first words>?"."""
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", text)]
    long = [s for s in sentences if len(s) >= 6] or [text.split()]
    words = " ".join(w.strip(".,;:!?()[]\"'") for w in rng.choice(long)[:8])
    return f"What does the text say about {words}?"


def calibrate_index(
    index_dir: str | Path,
    samples: int = 12,
    candidates: Sequence[str] = CANDIDATES,
    max_new_tokens: int = 16,
    seed: int = 0,
    engine: EpicEngine | None = None,
    manifest: IndexManifest | None = None,
    device: str | None = None,
    dtype: str | None = None,
) -> tuple[list[PolicyScore], str]:
    """Measure `candidates` on chunk sets of this index and record the recommended policy in
    its manifest (`manifest`: the one already read from `index_dir`; `device`, `dtype`: as
    `open_index` takes them); returns (scores, recommended)."""
    manifest = manifest or read_manifest(index_dir)
    app = open_index(index_dir, engine=engine, manifest=manifest, device=device, dtype=dtype)
    scores = calibrate(app.engine, calibration_samples(app, samples, seed), candidates, max_new_tokens=max_new_tokens)
    best = recommend(scores)
    manifest.policy = best
    manifest.calibration = {
        "rule": "lowest teacher-forced KL to full recompute at <= 1.5x AttnLink(16)'s TTFT",
        "samples": samples,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scores": [s.as_dict() for s in scores],
    }
    manifest.write(index_dir)
    return scores, best
