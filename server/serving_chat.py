"""POST /v1/chat/completions: a validated request checked against the model's limits, queued on
the engine worker, and answered whole (one JSON object) or streamed (server-sent events ending
with `data: [DONE]`, as the `openai` client reads them)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
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
    DeltaMessage,
    UsageInfo,
)
from .worker import EngineWorker, Job, QueueFull

logger = logging.getLogger(__name__)
DEFAULT_MAX_TOKENS = 256  # answer tokens when a request does not say


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server."""

    model_id: str
    max_question_tokens: int
    window: int  # the model's context length
    max_tokens: int  # the most answer tokens one request may ask for


def to_chat_request(request: ChatCompletionRequest, limits: Limits, count_tokens: Callable[[str], int]) -> ChatRequest:
    """The engine's request from a validated one, or an APIError for what the model cannot take."""
    if request.model != limits.model_id:
        raise APIError(
            404,
            f"the model {request.model!r} does not exist; this server has {limits.model_id!r}",
            "model",
            "model_not_found",
        )
    system = "\n".join(m.content for m in request.messages if m.role in ("system", "developer") and m.content.strip())
    turns = [
        ChatMessage(role=MessageRole(m.role), content=m.content)
        for m in request.messages
        if m.role in ("user", "assistant")
    ]
    question = turns[-1].content or ""
    field, max_tokens = request.answer_tokens
    max_tokens = max_tokens or min(DEFAULT_MAX_TOKENS, limits.max_tokens)
    if max_tokens > limits.max_tokens:
        raise APIError(400, f"{field} must be between 1 and {limits.max_tokens}, got {max_tokens}", field)
    n = count_tokens(question)
    if n + max_tokens > limits.window:
        raise APIError(
            400,
            f"the question is {n} tokens and {max_tokens} are asked for the answer; the model's context is "
            f"{limits.window} tokens: shorten the question or lower {field}",
            "messages",
            "context_length_exceeded",
        )
    if n > limits.max_question_tokens:
        raise APIError(
            400,
            f"the question is {n} tokens, over this server's limit of {limits.max_question_tokens}: shorten it",
            "messages",
            "context_length_exceeded",
        )
    return ChatRequest(
        question=question,
        history=turns[:-1],
        system=system or None,
        policy=request.policy,
        top_k=request.top_k,
        max_tokens=max_tokens,
        temperature=0.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
    )


class Completion:
    """The response objects of one completion, streamed or whole (one id and creation time)."""

    def __init__(self, model_id: str) -> None:
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), model_id

    def chunk(self, delta: DeltaMessage, report: AnswerReport | None = None) -> ChatCompletionStreamResponse:
        """One streamed chunk; the last one (with `report`) says why the answer ended and what it cost."""
        choice = ChatCompletionStreamChoice(delta=delta, finish_reason=report.finish_reason if report else None)
        return ChatCompletionStreamResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage(report) if report else None,
            epic_rag=report.extension() if report else None,
        )

    def whole(self, report: AnswerReport) -> ChatCompletionResponse:
        choice = ChatCompletionChoice(message=AssistantMessage(content=report.text), finish_reason=report.finish_reason)
        return ChatCompletionResponse(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage(report),
            epic_rag=report.extension(),
        )


def usage(report: AnswerReport) -> UsageInfo:
    """OpenAI's token counts of an answer: the whole prompt (reused or not) and the generated tokens."""
    return UsageInfo(
        prompt_tokens=report.tokens_prompt,
        completion_tokens=report.tokens_generated,
        total_tokens=report.tokens_prompt + report.tokens_generated,
    )


class OpenAIServingChat:
    """The chat-completions handler over one index (reopened when it is updated): requests run one
    at a time on `worker`, each on the index as it is when the request starts."""

    def __init__(
        self, live: LiveIndex, limits: Limits, worker: EngineWorker, metrics: Metrics, history_tokens: int
    ) -> None:
        self.live, self.limits, self.worker, self.metrics = live, limits, worker, metrics
        self.history_tokens = history_tokens
        tokenizer = live.current().engine.tokenizer
        self.count_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def create_chat_completion(self, body: bytes) -> Response:
        """Answer one request body: JSON when whole, an event stream when it asks to stream."""
        try:
            request = ChatCompletionRequest.model_validate_json(body)
        except ValidationError as err:
            raise APIError.from_validation(err) from None
        chat = to_chat_request(request, self.limits, self.count_tokens)
        completion = Completion(self.limits.model_id)
        if request.stream:
            events: asyncio.Queue = asyncio.Queue()
            job = self._submit(chat, *self._bridge(events))  # a full queue is a 503 before the stream starts
            return StreamingResponse(self._stream(job, events, completion), media_type="text/event-stream")
        report = await self._whole(chat)
        self.metrics.outcome(200)
        return JSONResponse(completion.whole(report).model_dump())

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

    async def _whole(self, chat: ChatRequest) -> AnswerReport:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def finish(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, done, result, error)

        job = self._submit(chat, lambda _delta: None, finish)
        try:
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

    async def _stream(self, job: Job, events: asyncio.Queue, completion: Completion) -> AsyncIterator[str]:
        try:
            yield _sse(completion.chunk(DeltaMessage(role="assistant", content="")))
            while True:
                item = await events.get()
                if item[0] == "delta":
                    yield _sse(completion.chunk(DeltaMessage(content=item[1])))
                    continue
                _, report, error = item
                if error is not None:
                    logger.error("a streamed request failed", exc_info=error)
                    self.metrics.outcome(500, "server_error")
                    yield _sse(APIError(500, f"the answer failed: {error}", kind="server_error").body())
                elif report is not None:
                    self.metrics.outcome(200)
                    yield _sse(completion.chunk(DeltaMessage(), report))
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
