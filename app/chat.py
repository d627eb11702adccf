"""A chat on the terminal: read a message, stream the answer, keep the conversation, print what it reused.

The loop of `epic-rag chat` and of ``examples/rag_chatbot.py``: both talk to the chat engine
of `RagApp.chat_engine`, so a follow-up sees the turns before it.
"""

from __future__ import annotations

from collections.abc import Callable

from epic_rag.integrations.llama_index.handoff import current_handoff, set_handoff
from llama_index.core.chat_engine.types import BaseChatEngine

from .report import format_report

QUIT = ("/quit", "/exit")
RESET = "/reset"


def chat_loop(chat: BaseChatEngine, check: Callable[[str], None] | None = None) -> None:
    """Answer the messages typed at ``you>`` until /quit, /exit or end of input; /reset clears
    the conversation. `check` may refuse a message (ValueError) before any work is done."""
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line in QUIT:
            return
        if line == RESET:
            chat.reset()
            print("(conversation cleared)")
            continue
        if not line:
            continue
        try:
            if check is not None:
                check(line)
        except ValueError as err:
            print(f"(not asked: {err})")
            continue
        chat_turn(chat, line)


def chat_turn(chat: BaseChatEngine, message: str) -> None:
    """One turn: stream the answer after ``bot>``, wait until it is in the history (the next
    turn must see it), then print the sources and what the turn reused."""
    set_handoff(None)  # this turn's calls only
    response = chat.stream_chat(message)
    handoff = current_handoff()
    print("bot> ", end="", flush=True)
    for delta in response.response_gen:
        print(delta, end="", flush=True)
    thread = getattr(response, "write_response_to_history_thread", None)
    if thread is not None:
        thread.join()
    print()
    condense = getattr(chat, "condense_call", None)
    if condense is not None:
        print(f"searched for: {chat.condensed}")
    print(format_report(response.source_nodes, handoff, before=[condense] if condense else []))
