"""Shared fixtures: tiny random-weight models for exact math, SmolLM2 for end to end, and the
texts the tests read (only what the project ships: examples/)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from epic_rag import EpicEngine, KVStore

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DOCS = ROOT / "examples" / "sample_docs"  # four short product documents (the README's index)
STDLIB_DOCS = ROOT / "examples" / "stdlib_docs"  # 23 pydoc pages, about 30,000 SmolLM2 tokens
SMOLLM2 = "smollm2-135m-instruct"
ESSAY_CHARS = 2600  # each essay at least this long: 600+ SmolLM2 tokens
SERVER_MARKERS = ("redis", "browser", "e2e")  # tests that start a server are slow too


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test that starts a server or loads the real model, so `-m "not slow"`
    runs on a machine with neither."""
    for item in items:
        needs_model = {"smollm2", "sample_index"} & set(getattr(item, "fixturenames", ()))
        if needs_model or any(item.get_closest_marker(name) for name in SERVER_MARKERS):
            item.add_marker(pytest.mark.slow)


class CharTokenizer:
    """A tiny deterministic tokenizer (one id per character) for random-weight models."""

    chat_template = None
    eos_token_id = 2

    def __init__(self, bos: bool = True) -> None:
        self.bos_token_id = 1 if bos else None

    def __call__(self, text: str, add_special_tokens: bool = False, return_offsets_mapping: bool = False) -> dict:
        ids = [4 + ord(c) % 120 for c in text]
        offsets = [(i, i + 1) for i in range(len(text))]
        if add_special_tokens and self.bos_token_id is not None:
            ids, offsets = [self.bos_token_id] + ids, [(0, 0)] + offsets
        return {"input_ids": ids, "offset_mapping": offsets} if return_offsets_mapping else {"input_ids": ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(ord("a") + (i - 4) % 26) for i in ids if i >= 4)

    def get_vocab(self) -> dict:
        return {}


def tiny_config(family: str = "llama", **overrides):
    common = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        attn_implementation="sdpa",
    )
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(family)


_CLASSES = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return _CLASSES[family](tiny_config(family, **overrides)).eval()


def tiny_engine(family: str = "llama", bos: bool = True, store: KVStore | None = None, **overrides) -> EpicEngine:
    return EpicEngine(tiny_model(family, **overrides), CharTokenizer(bos=bos), store)


def stdlib_essays(min_chars: int = ESSAY_CHARS) -> list[str]:
    """The shipped stdlib pages as one run of paragraphs, cut at paragraph breaks into texts of at
    least `min_chars` characters: long plain texts, as the benchmarks' essays are (29 of them)."""
    paragraphs = [
        p for path in sorted(STDLIB_DOCS.glob("*.txt")) for p in re.split(r"\n\s*\n", path.read_text()) if p.strip()
    ]
    essays, current = [], []
    for paragraph in paragraphs:
        current.append(paragraph)
        if sum(len(p) for p in current) >= min_chars:
            essays.append("\n\n".join(current))
            current = []
    return essays


@pytest.fixture(params=["llama", "qwen2", "mistral"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2() -> EpicEngine:
    """The real offline SmolLM2-135M-Instruct, fp32, memory-only store (shared by all slow tests)."""
    return EpicEngine.from_pretrained(SMOLLM2)


def smollm2_over(smollm2: EpicEngine, store: KVStore) -> EpicEngine:
    """An engine of the session's SmolLM2 weights (loaded once) over another store."""
    return EpicEngine(smollm2.model, smollm2.tokenizer, store, default_policy=smollm2.default_policy)


@pytest.fixture(scope="session")
def essays() -> list[str]:
    """Long plain texts from the shipped stdlib docs (see `stdlib_essays`)."""
    return stdlib_essays()


@pytest.fixture(scope="session")
def essay_folder(tmp_path_factory, essays) -> Path:
    """The `essays` as a folder of .txt files, in order: what the benchmarks' `--essays` takes."""
    folder = tmp_path_factory.mktemp("essays")
    for i, text in enumerate(essays):
        (folder / f"essay{i:02d}.txt").write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory, smollm2) -> Path:
    """examples/sample_docs indexed once with SmolLM2, as `epic-rag index` lays it out (named
    docs-index, its KV in kv/). Shared by every test that asks over it: a test that changes the
    folder (calibrates it, deletes KV) works on a copy (`shutil.copytree`)."""
    from epic_rag.app.index import build_index

    folder = tmp_path_factory.mktemp("sample") / "docs-index"
    engine = smollm2_over(smollm2, KVStore(folder / "kv"))
    build_index(SAMPLE_DOCS, folder, model=SMOLLM2, engine=engine, show_progress=False)
    return folder
