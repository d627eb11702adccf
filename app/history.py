"""The earlier chat turns a prompt keeps: the latest whole messages within a token bound.

Every kept turn is recomputed on every turn (it sits after the linked chunks), so the bound
is what keeps a long conversation's time to first token and window use flat. Messages are
dropped whole, oldest first, and the kept part starts with a user message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.memory.types import BaseMemory


class BoundedHistory(BaseMemory):
    """Chat memory whose `get()` returns at most `token_limit` tokens of the latest turns."""

    token_limit: int = Field(ge=0, description="most tokens of earlier turns in a prompt")
    messages: list[ChatMessage] = Field(default_factory=list)
    _count: Callable[[str], int] = PrivateAttr()

    def __init__(self, token_limit: int, tokenizer_fn: Callable[[str], list], **kwargs: Any) -> None:
        super().__init__(token_limit=token_limit, **kwargs)
        self._count = lambda text: len(tokenizer_fn(text))

    @classmethod
    def class_name(cls) -> str:
        return "BoundedHistory"

    @classmethod
    def from_defaults(
        cls, token_limit: int, tokenizer_fn: Callable[[str], list], chat_history: list[ChatMessage] | None = None
    ) -> BoundedHistory:
        return cls(token_limit, tokenizer_fn, messages=list(chat_history or []))

    def get(self, input: str | None = None, **kwargs: Any) -> list[ChatMessage]:
        kept, total = [], 0
        for message in reversed(self.messages):
            total += self._count(message.content or "")
            if total > self.token_limit:
                break
            kept.append(message)
        kept.reverse()
        while kept and kept[0].role != MessageRole.USER:
            kept.pop(0)
        return kept

    def get_all(self) -> list[ChatMessage]:
        return list(self.messages)

    def put(self, message: ChatMessage) -> None:
        self.messages.append(message)

    def set(self, messages: list[ChatMessage]) -> None:
        self.messages = list(messages)

    def reset(self) -> None:
        self.messages = []
