"""KVSplit: token budget, whole sentences, separators, boundary functions, determinism."""

from __future__ import annotations

import itertools
import re

import pytest
from transformers import AutoTokenizer

from epic_rag.chunking import KVSplit, count_tokens_with, fixed_size_split, load_sentence_encoder, sentence_spans
from epic_rag.model import resolve_model_folder

from .conftest import STDLIB_DOCS

pytestmark = pytest.mark.slow  # the real SmolLM2 tokenizer and MiniLM encoder
SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


@pytest.fixture(scope="module")
def count():
    return count_tokens_with(AutoTokenizer.from_pretrained(resolve_model_folder("smollm2-135m-instruct")))


@pytest.fixture(scope="module")
def encoder():
    return load_sentence_encoder()


@pytest.fixture(scope="module")
def essay() -> str:
    """A shipped pydoc page, prose paragraphs between signatures: 1,747 SmolLM2 tokens."""
    return (STDLIB_DOCS / "base64.txt").read_text()


def _check_cover(text: str, chunks) -> None:
    """Chunks are exact, ordered, non-overlapping slices that keep every word."""
    assert all(text[c.start : c.end] == c.text for c in chunks)
    assert all(a.end <= b.start for a, b in itertools.pairwise(chunks))
    assert "".join(c.text for c in chunks).split() == text.split() or " ".join(
        " ".join(c.text.split()) for c in chunks
    ) == " ".join(text.split())


def test_budget_and_whole_sentences_on_prose(count, encoder, essay):
    splitter = KVSplit(count, target_tokens=200, max_tokens=300, min_tokens=50, embed=encoder)
    chunks = splitter.split(essay)
    assert len(chunks) > 3
    _check_cover(essay, chunks)
    for c in chunks:
        assert count(c.text) == c.tokens <= 300
        assert c.tokens >= 50 or c is chunks[-1]
    ends = {e for _, e in sentence_spans(essay)}
    assert all(c.end in ends for c in chunks), "a chunk ended inside a sentence"
    assert sum(bool(SENTENCE_END.search(c.text)) for c in chunks[:-1]) == len(chunks) - 1


def test_reserve_shrinks_the_budget(count, essay):
    chunks = KVSplit(count, target_tokens=200, max_tokens=300, min_tokens=50, embed=None).split(essay, reserve=40)
    assert max(c.tokens for c in chunks) <= 260


def test_oversized_sentence_is_cut_within_budget(count):
    text = "Short start. " + " ".join(f"word{i}" for i in range(400)) + ". Short end."
    chunks = KVSplit(count, target_tokens=60, max_tokens=80, min_tokens=10, embed=None).split(text)
    assert all(c.tokens <= 80 for c in chunks)
    _check_cover(text, chunks)


def test_custom_separator_starts_every_unit(count):
    passages = [f"Passage {i}: " + f"Topic {i} has fact number {i}. " * 6 for i in range(1, 6)]
    text = "\n".join(passages)
    chunks = KVSplit(
        count, target_tokens=400, max_tokens=500, min_tokens=0, embed=None, separator=r"Passage \d+:"
    ).split(text)
    assert [c.text.split(":")[0] for c in chunks] == [f"Passage {i}" for i in range(1, 6)]
    assert all(c.text.count("Passage") == 1 for c in chunks)


def test_boundary_function_decides_the_cut(count):
    sentences = [f"Sentence number {i} is here." for i in range(12)]
    text = " ".join(sentences)

    def cut_after_seven(sents: list[str]) -> list[float]:
        return [5.0 if i == 7 else 0.0 for i in range(len(sents) - 1)]

    splitter = KVSplit(count, target_tokens=50, max_tokens=80, min_tokens=10, boundary_fn=cut_after_seven)
    chunks = splitter.split(text)
    assert any(c.text.endswith("Sentence number 7 is here.") for c in chunks)


BREAD = (
    "Bread dough needs flour, water, salt and yeast. Knead the dough until it is smooth and elastic. "
    "Let it rise in a warm kitchen for about an hour. Shape the loaf gently so the air stays inside. "
    "Bake it in a hot oven until the crust turns golden brown. Let the bread cool before you slice it."
)
VOLCANO = (
    "Volcanoes form where molten rock rises through the crust of the Earth. Magma that reaches the surface is "
    "called lava. Some volcanoes erupt explosively and throw ash high into the atmosphere. Others release slow "
    "rivers of basalt that cool into black stone. Geologists measure ground swelling to forecast eruptions. "
    "The island of Iceland sits on a ridge with many active volcanoes."
)


def test_semantic_cut_falls_between_topics(count, encoder):
    volcano = (
        VOLCANO + " Lava flows can bury roads and whole villages. Volcanic soil is often very fertile for farming."
    )
    text = BREAD + " " + volcano
    total = count(text)
    budget = dict(target_tokens=total // 2, max_tokens=total - 10, min_tokens=10)
    assert [c.text for c in KVSplit(count, embed=encoder, **budget).split(text)] == [BREAD, volcano]
    # the control: the topics are not the same length, so on size alone the cut falls elsewhere
    assert [c.text for c in KVSplit(count, embed=None, **budget).split(text)] != [BREAD, volcano]


def test_deterministic(count, encoder, essay):
    first = KVSplit(count, target_tokens=150, max_tokens=250, min_tokens=40, embed=encoder).split(essay)
    again = KVSplit(count, target_tokens=150, max_tokens=250, min_tokens=40, embed=encoder).split(essay)
    assert first == again


def test_fixed_size_baseline(count, essay):
    chunks = fixed_size_split(essay, count, chunk_tokens=128)
    assert all(c.tokens <= 128 for c in chunks)
    assert max(c.tokens for c in chunks) > 100
    _check_cover(essay, chunks)


def test_bad_budget_is_refused(count):
    with pytest.raises(ValueError, match="min_tokens"):
        KVSplit(count, target_tokens=100, max_tokens=50)
