"""Shared fixtures: tiny random-weight models for exact math, SmolLM2 for end to end."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from epic_rag import EpicEngine, KVStore
from epic_rag_bench.data import default_data_dir

SHARED_DATA = default_data_dir()


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


@pytest.fixture(params=["llama", "qwen2", "mistral"])
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def smollm2() -> EpicEngine:
    """The real offline SmolLM2-135M-Instruct, fp32, memory-only store (shared by all slow tests)."""
    return EpicEngine.from_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def essays() -> list[str]:
    """Plain-text essays from the shared evaluation data (read in place, never copied)."""
    folder = SHARED_DATA / "haystack"
    files = sorted(folder.glob("*.txt"))
    assert files, f"no essays under {folder}; set EPIC_RAG_DATA to the shared data folder"
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]
