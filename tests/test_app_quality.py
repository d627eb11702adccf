"""Scoring of the app-quality benchmark and the question files it reads (no model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from epic_rag_bench.app_quality import (
    Turn,
    declines,
    judge,
    read_conversations,
    read_questions,
)
from epic_rag.app.prompts import NOT_IN_DOCUMENTS

QA = Path(__file__).resolve().parents[1] / "benchmarks" / "qa"


@pytest.mark.parametrize(
    "answer",
    [NOT_IN_DOCUMENTS, "I don't know.", "The context does not mention a phone number.", "That is not specified."],
)
def test_declining_answers_are_recognised(answer):
    assert declines(answer)


@pytest.mark.parametrize("answer", ["Three years.", "The S3 costs 14,500 euros.", "No, ice damage is excluded."])
def test_answers_are_not_taken_for_declines(answer):
    assert not declines(answer)


def test_judge_needs_every_fact_and_no_decline():
    both = Turn("cost and warranty?", [["14,500"], ["three years", "3 years"]])
    assert judge("It costs 14,500 euros and has a 3 years warranty.", both)
    assert not judge("It costs 14,500 euros.", both)
    assert not judge("14,500 euros; the documents do not say the warranty, three years maybe", both)
    unanswerable = Turn("phone number?", [])
    assert judge(NOT_IN_DOCUMENTS, unanswerable)
    assert not judge("+47 555 0100", unanswerable)


def test_shipped_question_files_parse():
    answerable = read_questions(QA / "sample_docs_questions.jsonl")
    unanswerable = read_questions(QA / "sample_docs_unanswerable.jsonl")
    assert len(answerable) >= 10 and all(c.turns[0].answerable for c in answerable)
    assert len(unanswerable) >= 5 and not any(c.turns[0].answerable for c in unanswerable)
    conversations = read_conversations(QA / "sample_docs_conversations.jsonl")
    turns = [t for c in conversations for t in c.turns]
    assert all(len(c.turns) >= 2 for c in conversations)
    assert sum(not t.answerable for t in turns) >= 4 and sum(t.answerable for t in turns) >= 10
