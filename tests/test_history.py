"""The chat history bound: latest whole messages within the token limit, starting with a user turn."""

from __future__ import annotations

from epic_rag.app.history import BoundedHistory
from llama_index.core.base.llms.types import ChatMessage, MessageRole


def words(text: str) -> list[str]:
    return text.split()


def conversation(history: BoundedHistory, turns: int) -> None:
    for i in range(turns):
        history.put(ChatMessage(role=MessageRole.USER, content=f"question {i}"))  # 2 tokens
        history.put(ChatMessage(role=MessageRole.ASSISTANT, content=f"answer {i} in four"))  # 4 tokens


def test_keeps_the_latest_whole_turns_within_the_bound():
    history = BoundedHistory.from_defaults(13, words)
    conversation(history, 4)
    kept = history.get()
    assert [m.content for m in kept] == ["question 2", "answer 2 in four", "question 3", "answer 3 in four"]
    assert sum(len(words(m.content)) for m in kept) <= 13
    assert len(history.get_all()) == 8  # nothing the user said is lost, only left out of the prompt


def test_never_starts_with_an_answer_and_zero_keeps_nothing():
    history = BoundedHistory.from_defaults(5, words)
    conversation(history, 2)
    assert history.get() == []  # "answer 1 in four" fits, but a history cannot start with it
    none = BoundedHistory.from_defaults(0, words)
    conversation(none, 1)
    assert none.get() == []
    none.reset()
    assert none.get_all() == []
