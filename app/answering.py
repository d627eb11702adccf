"""One chat request answered on an opened index: retrieval, KV linking, the policy, decoding.

A request whose only message is the user's question is answered exactly as `epic-rag ask`
answers it; one with earlier turns (or a system message of its own) as `epic-rag chat`
does: retrieval on the latest user message, earlier turns kept up to a token bound.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from epic_rag.integrations.llama_index.handoff import Handoff, current_handoff, set_handoff
from epic_rag.integrations.llama_index.llm import EpicLLM
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from .index import HISTORY_TOKENS, RagApp

SNIPPET_CHARS = 240


@dataclass
class ChatRequest:
    """One question to answer, with what the client asked for (the server builds it from an OpenAI request)."""

    question: str
    history: list[ChatMessage] = field(default_factory=list)  # earlier user/assistant turns, oldest first
    system: str | None = None  # the client's own instructions, added after ours
    policy: str | None = None  # None: the app's policy
    top_k: int | None = None  # None: the app's
    max_tokens: int = 256
    min_tokens: int = 0  # no end token before this many answer tokens
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (not included)
    retrieval: bool = True  # False: the model alone, no documents (a chat client's titles, tags, small talk)
    raw: bool = False  # without retrieval: continue `question` as plain text, no chat template (completions)


@dataclass
class Source:
    """A retrieved chunk the answer was given: its file, retrieval score and the start of its text."""

    file: str
    score: float | None
    snippet: str


@dataclass
class AnswerReport:
    """What an answer said and what it cost; `extension()` is what clients see of it."""

    text: str
    finish_reason: str  # "stop", "length" or "cancelled"
    policy: str
    sources: list[Source]
    ttft_s: float
    tokens_prompt: int
    tokens_reused: int
    tokens_recomputed: int
    tokens_generated: int
    cache_hits: int
    cache_misses: int
    chunks_linked: int
    decode_s: float
    kv_tier_reads: dict[str, int]  # store lookups each tier answered during this answer (memory, disk, redis)

    def extension(self) -> dict[str, Any]:
        """The `epic_rag` field of a response: every field but the text and finish reason (sent apart)."""
        fields = asdict(self)
        del fields["text"], fields["finish_reason"]
        return fields


def answer(
    app: RagApp,
    request: ChatRequest,
    emit: Callable[[str], None],
    cancel: threading.Event | None = None,
    history_tokens: int = HISTORY_TOKENS,
) -> AnswerReport:
    """Answer `request`, passing each text delta to `emit` as it is generated.

    Setting `cancel` stops decoding at the next token; the report then says "cancelled"."""
    llm = EpicLLM(
        app.engine,
        cancel=cancel,
        model_name=app.llm.model_name,
        policy=request.policy or app.llm.policy,
        max_new_tokens=request.max_tokens,
        min_new_tokens=request.min_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        stop=list(request.stop),
        persist_prompt_head=request.system is None,  # a client's own system text stays in memory
    )
    rag = RagApp(app.index, llm, app.embed, top_k=request.top_k or app.top_k)
    set_handoff(None)
    with app.engine.store.counting_reads() as reads:  # this answer's, whatever runs beside it
        response, text = _generate(rag, llm, request, emit, history_tokens)
    sources = response.source_nodes if response is not None else []
    return _report(text, sources, cancel is not None and cancel.is_set(), llm.policy, reads)


def _generate(
    rag: RagApp, llm: EpicLLM, request: ChatRequest, emit: Callable[[str], None], history_tokens: int
) -> tuple[Any, str]:
    """(the LlamaIndex response, None without retrieval; the answer text), each delta emitted."""
    writer = None
    if not request.retrieval:
        set_handoff(Handoff(chunks=[]))  # no chunks: the call's report still lands here
        if request.raw:
            deltas = (r.delta for r in llm.stream_complete(request.question, formatted=True))
        else:
            system = [ChatMessage(role=MessageRole.SYSTEM, content=request.system)] if request.system else []
            messages = [*system, *request.history, ChatMessage(role=MessageRole.USER, content=request.question)]
            deltas = (r.delta for r in llm.stream_chat(messages))
        response = None
    elif request.history or request.system:
        chat = rag.chat_engine(history_tokens=history_tokens, extra_system=request.system)
        response = chat.stream_chat(request.question, chat_history=list(request.history))
        deltas, writer = response.response_gen, getattr(response, "write_response_to_history_thread", None)
    else:
        response = rag.query_engine(streaming=True).query(request.question)
        deltas = response.response_gen
    text = ""
    for delta in deltas:
        text += delta
        emit(delta)
    if writer is not None:
        writer.join()
    return response, text


def _report(
    text: str, source_nodes: list[Any], cancelled: bool, policy: str, kv_tier_reads: dict[str, int]
) -> AnswerReport:
    handoff = current_handoff()
    calls = handoff.calls if handoff is not None else []
    sources = [
        Source(
            file=str(n.node.metadata.get("file_name", n.node.node_id)),
            score=None if n.score is None else round(float(n.score), 4),
            snippet=" ".join(n.node.get_content().split())[:SNIPPET_CHARS],
        )
        for n in source_nodes
    ]
    finish = "cancelled" if cancelled or not calls else ("length" if calls[-1].finish_reason == "length" else "stop")
    return AnswerReport(
        text=text,
        finish_reason=finish,
        policy=calls[0].policy if calls else policy,
        sources=sources,
        ttft_s=calls[0].ttft_s if calls else 0.0,
        tokens_prompt=sum(c.tokens_total for c in calls),
        tokens_reused=sum(c.tokens_reused for c in calls),
        tokens_recomputed=sum(c.tokens_recomputed for c in calls),
        tokens_generated=sum(c.tokens_generated for c in calls),
        cache_hits=sum(c.store_hits for c in calls),
        cache_misses=sum(c.store_misses for c in calls),
        chunks_linked=sum(c.chunks_matched for c in calls),
        decode_s=sum(c.decode_s for c in calls),
        kv_tier_reads=kv_tier_reads,
    )
