"""POST /v1/chat/completions and /v1/completions: a validated request checked against the model's
limits, queued on the engine worker, and answered whole (one JSON object) or streamed
(server-sent events ending with `data: [DONE]`, as the `openai` client reads them).

The index answers under two model ids: ``<id>`` retrieves and answers from the documents,
``<id>:chat`` (or a request with ``epic_rag: {"retrieval": false}``) talks to the model
alone, for what a chat client asks besides questions (titles, tags, follow-up ideas).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from epic_rag.app.answering import AnswerReport, ChatRequest, answer
from epic_rag.app.live_index import LiveIndex
from fastapi.responses import JSONResponse, Response, StreamingResponse
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from pydantic import BaseModel, ValidationError

from .metrics import Metrics
from .protocol import (
    APIError,
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamChoice,
    ChatCompletionStreamResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    DeltaMessage,
    GenerationRequest,
    PromptTokensDetails,
    StreamChunk,
    UsageInfo,
)
from .worker import EngineWorker, Job, QueueFull

logger = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 256  # answer tokens when a request does not say
CHAT_SUFFIX = ":chat"  # the model id without retrieval
DISCONNECT_POLL_S = 0.25  # how often a whole (non-streamed) request checks that its client is still there


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server."""

    model_id: str
    max_question_tokens: int
    window: int  # the model's context length
    max_tokens: int  # the most answer tokens one request may ask for

    @property
    def model_ids(self) -> list[str]:
        """The ids this server answers under: with retrieval, then without."""
        return [self.model_id, self.model_id + CHAT_SUFFIX]


def to_chat_request(request: GenerationRequest, limits: Limits, count_tokens: Callable[[str], int]) -> ChatRequest:
    """The engine's request from a validated one, or an APIError for what the model cannot take."""
    if request.model not in limits.model_ids:
        raise APIError(
            404,
            f"the model {request.model!r} does not exist; this server has {' and '.join(map(repr, limits.model_ids))}",
            "model",
            "model_not_found",
        )
    retrieval = request.model == limits.model_id and request.epic_rag.retrieval
    if isinstance(request, ChatCompletionRequest):
        system = "\n".join(
            m.content for m in request.messages if m.role in ("system", "developer") and m.content.strip()
        )
        turns = [
            ChatMessage(role=MessageRole(m.role), content=m.content)
            for m in request.messages
            if m.role in ("user", "assistant")
        ]
        question, history, raw = turns[-1].content or "", turns[:-1], False
    else:
        assert isinstance(request, CompletionRequest)
        system, question, history, raw = "", request.prompt, [], not retrieval
    field, max_tokens = request.answer_tokens
    max_tokens = max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"{field} must be between 1 and {limits.max_tokens}, got {max_tokens}", field)
    if request.min_tokens > max_tokens:
        raise APIError(400, f"min_tokens ({request.min_tokens}) must not exceed {field} ({max_tokens})", "min_tokens")
    n = count_tokens(question)
    where = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    if n + max_tokens > limits.window:
        raise APIError(
            400,
            f"the question is {n} tokens and {max_tokens} are asked for the answer; the model's context is "
            f"{limits.window} tokens: shorten the question or lower {field}",
            where,
            "context_length_exceeded",
        )
    if n > limits.max_question_tokens:
        raise APIError(
            400,
            f"the question is {n} tokens, over this server's limit of {limits.max_question_tokens}: shorten it",
            where,
            "context_length_exceeded",
        )
    return ChatRequest(
        question=question,
        history=history,
        system=system or None,
        policy=request.policy,
        top_k=request.top_k,
        max_tokens=max_tokens,
        min_tokens=request.min_tokens,
        temperature=0.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=tuple(request.stop),
        retrieval=retrieval,
        raw=raw,
    )


def usage(report: AnswerReport) -> UsageInfo:
    """OpenAI's token counts of an answer: the whole prompt (reused or not, the reused part as
    `cached_tokens`) and the generated tokens."""
    return UsageInfo(
        prompt_tokens=report.tokens_prompt,
        completion_tokens=report.tokens_generated,
        total_tokens=report.tokens_prompt + report.tokens_generated,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=report.tokens_reused),
    )


class ChatShape:
    """The response objects of one chat completion, streamed or whole (one id and creation time)."""

    id_prefix = "chatcmpl"

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = f"{self.id_prefix}-{uuid.uuid4().hex}", int(time.time()), model

    def _chunk(self, choices: list[ChatCompletionStreamChoice], **extra: Any) -> ChatCompletionStreamResponse:
        return ChatCompletionStreamResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )

    def opening(self) -> StreamChunk | None:
        return self._chunk([ChatCompletionStreamChoice(delta=DeltaMessage(role="assistant", content=""))])

    def delta(self, text: str) -> StreamChunk:
        return self._chunk([ChatCompletionStreamChoice(delta=DeltaMessage(content=text))])

    def finish(self, report: AnswerReport) -> StreamChunk:
        choice = ChatCompletionStreamChoice(delta=DeltaMessage(), finish_reason=report.finish_reason)
        return self._chunk([choice], epic_rag=report.extension())

    def usage_chunk(self, report: AnswerReport) -> StreamChunk:
        return self._chunk([], usage=usage(report))

    def whole(self, report: AnswerReport) -> BaseModel:
        choice = ChatCompletionChoice(message=AssistantMessage(content=report.text), finish_reason=report.finish_reason)
        return ChatCompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage(report),
            epic_rag=report.extension(),
        )  # fmt: skip


class TextShape(ChatShape):
    """The response objects of one completion (`text_completion`, streamed or whole)."""

    id_prefix = "cmpl"

    def _text_chunk(self, choices: list[CompletionChoice], **extra: Any) -> CompletionStreamResponse:
        return CompletionStreamResponse(id=self.id, created=self.created, model=self.model, choices=choices, **extra)

    def opening(self) -> StreamChunk | None:
        return None  # a completion stream starts with its first text

    def delta(self, text: str) -> StreamChunk:
        return self._text_chunk([CompletionChoice(text=text)])

    def finish(self, report: AnswerReport) -> StreamChunk:
        return self._text_chunk(
            [CompletionChoice(text="", finish_reason=report.finish_reason)], epic_rag=report.extension()
        )

    def usage_chunk(self, report: AnswerReport) -> StreamChunk:
        return self._text_chunk([], usage=usage(report))

    def whole(self, report: AnswerReport) -> BaseModel:
        choice = CompletionChoice(text=report.text, finish_reason=report.finish_reason)
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=[choice], usage=usage(report),
            epic_rag=report.extension(),
        )  # fmt: skip


class OpenAIServing:
    """The completion handlers over one index (reopened when it is updated): requests run on
    `worker`'s runners, each on the index as it is when the request starts."""

    def __init__(
        self, live: LiveIndex, limits: Limits, worker: EngineWorker, metrics: Metrics, history_tokens: int
    ) -> None:
        self.live, self.limits, self.worker, self.metrics = live, limits, worker, metrics
        self.history_tokens = history_tokens
        tokenizer = live.current().engine.tokenizer
        self.count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def create_chat_completion(self, body: bytes, disconnected: Callable[[], Awaitable[bool]]) -> Response:
        return await self._create(body, ChatCompletionRequest, ChatShape, disconnected)

    async def create_completion(self, body: bytes, disconnected: Callable[[], Awaitable[bool]]) -> Response:
        return await self._create(body, CompletionRequest, TextShape, disconnected)

    async def _create(
        self,
        body: bytes,
        kind: type[GenerationRequest],
        shape_of: Callable[[str], ChatShape],
        disconnected: Callable[[], Awaitable[bool]],
    ) -> Response:
        """Answer one request body: JSON when whole, an event stream when it asks to stream."""
        try:
            request = kind.model_validate_json(body)
        except ValidationError as err:
            raise APIError.from_validation(err) from None
        chat = to_chat_request(request, self.limits, self.count_tokens)
        shape = shape_of(request.model)
        if request.stream:
            events: asyncio.Queue = asyncio.Queue()
            job = self._submit(chat, *self._bridge(events))  # a full queue is a 503 before the stream starts
            return StreamingResponse(
                self._stream(job, events, shape, request.include_usage), media_type="text/event-stream"
            )
        report = await self._whole(chat, disconnected)
        if report.finish_reason != "cancelled":  # a cancelled answer went to nobody
            self.metrics.outcome(200)
        return JSONResponse(shape.whole(report).model_dump())

    def _submit(
        self, chat: ChatRequest, on_delta: Callable[[str], None], finish: Callable[[Any, BaseException | None], None]
    ) -> Job:
        def finished(report: AnswerReport | None, error: BaseException | None) -> None:
            if report is not None:
                self.metrics.record(report)
            finish(report, error)

        def run(cancel: threading.Event) -> AnswerReport:
            return answer(self.live.current(), chat, on_delta, cancel, self.history_tokens)

        job = Job(run=run, finish=finished)
        try:
            self.worker.submit(job)
        except QueueFull as err:
            raise APIError(503, f"the server is busy ({err}); retry in a few seconds", code="queue_full") from None
        return job

    async def _whole(self, chat: ChatRequest, disconnected: Callable[[], Awaitable[bool]]) -> AnswerReport:
        """The finished answer; a client that hangs up before it is ready cancels it."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def finish(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, done, result, error)

        job = self._submit(chat, lambda _delta: None, finish)
        try:
            while not done.done():
                await asyncio.wait([done], timeout=DISCONNECT_POLL_S)
                if not done.done() and await disconnected():
                    job.cancel.set()  # the engine stops within a layer or a token; `done` still settles
            return await done
        except ValueError as err:  # what the engine refuses (a prompt over the model's window, ...)
            raise APIError(400, str(err)) from None
        except Exception as err:
            logger.exception("a request failed")
            raise APIError(500, f"the answer failed: {err}", kind="server_error") from None
        finally:
            job.cancel.set()  # a client that went away frees its slot

    @staticmethod
    def _bridge(events: asyncio.Queue) -> tuple[Callable[[str], None], Callable[[Any, BaseException | None], None]]:
        """(on_delta, finish) callbacks that hand the worker thread's output to the event loop."""
        loop = asyncio.get_running_loop()

        def put(item: tuple) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, item)

        return (lambda delta: put(("delta", delta))), (lambda result, error: put(("end", result, error)))

    async def _stream(
        self, job: Job, events: asyncio.Queue, shape: ChatShape, include_usage: bool
    ) -> AsyncIterator[str]:
        try:
            if (opening := shape.opening()) is not None:
                yield _sse(opening)
            while True:
                item = await events.get()
                if item[0] == "delta":
                    yield _sse(shape.delta(item[1]))
                    continue
                _, report, error = item
                if error is not None:
                    logger.error("a streamed request failed", exc_info=error)
                    self.metrics.outcome(500, "server_error")
                    yield _sse(APIError(500, f"the answer failed: {error}", kind="server_error").body())
                elif report is not None:
                    self.metrics.outcome(200)
                    yield _sse(shape.finish(report))
                    if include_usage:
                        yield _sse(shape.usage_chunk(report))
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancel.set()  # the client went away, or the answer is done: either way the slot is free


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    elif result is None:
        future.set_exception(RuntimeError("the request was cancelled"))
    else:
        future.set_result(result)


def _sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event, its JSON spaced as `json.dumps` writes it."""
    data = payload.model_dump() if isinstance(payload, BaseModel) else payload
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
