"""Scoring of the app-quality benchmark and the question files it reads (no model)."""

from __future__ import annotations

import json

import pytest
from epic_rag.app.prompts import NOT_IN_DOCUMENTS
from epic_rag_bench.app_quality import (
    Conversation,
    Turn,
    declines,
    judge,
    read_conversations,
    read_questions,
)

from .conftest import ROOT, SAMPLE_DOCS

QA = ROOT / "benchmarks" / "qa"


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


def test_readers_parse_questions_and_conversations(tmp_path):
    questions = tmp_path / "questions.jsonl"
    questions.write_text(
        '{"id": "a", "question": "Cost?", "answers": ["14,500", "14500"]}\n\n{"id": "b", "question": "Fax?"}\n'
    )
    assert read_questions(questions) == [
        Conversation("a", [Turn("Cost?", [["14,500", "14500"]])]),
        Conversation("b", [Turn("Fax?", [])]),  # no answers: the documents do not say
    ]
    chats = tmp_path / "chats.jsonl"
    turns = [{"question": "Weight?", "expect": [["38 kg"], ["yellow"]]}, {"question": "Fax?", "expect": []}]
    chats.write_text(json.dumps({"id": "c", "turns": turns}) + "\n")
    [chat] = read_conversations(chats)
    assert chat == Conversation("c", [Turn("Weight?", [["38 kg"], ["yellow"]]), Turn("Fax?", [])])
    assert [t.answerable for t in chat.turns] == [True, False]


def test_shipped_questions_rest_on_the_sample_documents():
    rows = [json.loads(line) for line in (QA / "sample_docs_questions.jsonl").read_text().splitlines()]
    for row in rows:  # each evidence sentence is quoted from the document it names
        for evidence in row["evidence"]:
            name, sentence = evidence.split(": ", 1)
            assert sentence in (SAMPLE_DOCS / name).read_text(), (row["id"], evidence)
    assert [c.turns[0].expect for c in read_questions(QA / "sample_docs_questions.jsonl")] == [
        [r["answers"]] for r in rows
    ]
    documents = "\n".join(path.read_text() for path in sorted(SAMPLE_DOCS.iterdir()))
    chats = read_conversations(QA / "sample_docs_conversations.jsonl")
    facts = [fact for c in chats for t in c.turns for fact in t.expect]
    assert [f for f in facts if not any(spelling in documents for spelling in f)] == []  # each said in the documents
    unanswerable = read_questions(QA / "sample_docs_unanswerable.jsonl")
    lines = (QA / "sample_docs_unanswerable.jsonl").read_text().splitlines()
    assert [c.turns[0].question for c in unanswerable] == [json.loads(line)["question"] for line in lines]
    assert not any(c.turns[0].answerable for c in unanswerable)


def test_questions_alone_are_asked_without_a_chat_pass(sample_index, smollm2, tmp_path):
    import shutil

    from epic_rag.app.index import open_index
    from epic_rag_bench.app_quality import evaluate

    from epic_rag import KVStore

    from .conftest import smollm2_over

    folder = tmp_path / "index"
    shutil.copytree(sample_index, folder)
    app = open_index(folder, engine=smollm2_over(smollm2, KVStore(folder / "kv")), max_new_tokens=12)
    questions = read_questions(QA / "sample_docs_questions.jsonl")[:2]
    summaries, answers = evaluate(app, ["reuse"], questions, [], ("latest",), progress=False)
    assert [(s.mode, s.policy) for s in summaries] == [("ask", "reuse")]
    assert list(answers) == ["ask/reuse"] and [a["question"] for a in answers["ask/reuse"]] == [
        q.turns[0].question for q in questions
    ]
