"""`epic-rag serve`: an OpenAI-compatible chat server over an index, with a web chat page.

One model in memory; requests wait in a bounded queue and run one at a time (see
`engine_worker`). `/v1/models` lists the index as a model, `/v1/chat/completions` answers
with retrieval, KV linking and the policy done here, `/health` and `/metrics` (Prometheus)
are for operators, and `/` is the web chat.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from epic_rag.app.answering import AnswerReport, ChatRequest, answer
from epic_rag.app.index import HISTORY_TOKENS, RagApp
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from epic_rag.store import TieredStore

from .protocol import APIError, Completion, Limits, parse_chat_request
from .worker import EngineWorker, Job, QueueFull

logger = logging.getLogger(__name__)
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RETRY_AFTER_S = 5
WEB = resources.files(__package__) / "web"


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, worker: EngineWorker) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("epic_rag_requests", "Chat completion requests by outcome", ["status"], registry=r)
        self.errors = Counter("epic_rag_request_errors", "Requests that failed, by error type", ["type"], registry=r)
        self.ttft = Histogram(
            "epic_rag_ttft_seconds",
            "Time to first token",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
            registry=r,
        )
        self.decode = Histogram(
            "epic_rag_decode_seconds",
            "Decoding time per answer",
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.reused = Counter("epic_rag_tokens_reused", "Prompt tokens whose KV was linked from the store", registry=r)
        self.recomputed = Counter(
            "epic_rag_tokens_recomputed", "Prompt tokens computed through every layer", registry=r
        )
        self.hits = Counter("epic_rag_store_hits", "Chunk KV entries linked from the store", registry=r)
        self.misses = Counter(
            "epic_rag_store_misses", "Chunk KV entries computed because the store lacked them", registry=r
        )
        self.cancelled = Counter(
            "epic_rag_cancelled", "Answers stopped early because their client went away", registry=r
        )
        self.queue = Gauge("epic_rag_queue_depth", "Requests waiting or running", registry=r)
        self.queue.set_function(lambda: worker.depth)

    def watch_store(self, store: TieredStore) -> None:
        """Export the KV store's tiers (hits served, failures, damaged entries, availability)."""
        self.registry.register(_TierCollector(store))

    def record(self, report: AnswerReport) -> None:
        if report.finish_reason == "cancelled":
            self.cancelled.inc()
        self.ttft.observe(report.ttft_s)
        self.decode.observe(report.decode_s)
        self.reused.inc(report.tokens_reused)
        self.recomputed.inc(report.tokens_recomputed)
        self.hits.inc(report.cache_hits)
        self.misses.inc(report.cache_misses)


class _TierCollector(Collector):
    """Per-tier counters of a KV store, read at scrape time (a shared tier's outages show here)."""

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    def collect(self):
        hits = CounterMetricFamily("epic_rag_kv_tier_hits", "Store hits served by each KV tier", labels=["tier"])
        errors = CounterMetricFamily(
            "epic_rag_kv_tier_errors", "KV tier operations failed or skipped (tier unreachable)", labels=["tier"]
        )
        damaged = CounterMetricFamily(
            "epic_rag_kv_tier_corrupted", "Damaged KV entries found, deleted and recomputed", labels=["tier"]
        )
        up = GaugeMetricFamily(
            "epic_rag_kv_tier_up", "1 while a KV tier answers, 0 while it is skipped", labels=["tier"]
        )
        served = self.store.hits_by_tier()
        for backend in self.store.backends:
            counters = backend.counters()
            hits.add_metric([backend.name], served.get(backend.name, 0))
            errors.add_metric([backend.name], counters.errors)
            damaged.add_metric([backend.name], counters.corrupted)
            up.add_metric([backend.name], float(getattr(backend, "available", True)))
        yield from (hits, errors, damaged, up)


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without a key."""
    if host not in LOOPBACK and not api_key:
        raise ValueError(
            f"refusing to listen on {host} without an API key: anyone who can reach the port could use the model "
            "and read the indexed documents. Pass --api-key KEY (or set EPIC_RAG_API_KEY), or bind 127.0.0.1"
        )


def create_app(
    rag: RagApp,
    model_id: str,
    api_key: str | None = None,
    max_waiting: int = 16,
    max_question_tokens: int = 1024,
    max_tokens: int = 1024,
    history_tokens: int = HISTORY_TOKENS,
) -> FastAPI:
    """The FastAPI app serving `rag` under the model id `model_id`."""
    worker = EngineWorker(max_waiting)
    metrics = Metrics(worker)
    metrics.watch_store(rag.engine.store)
    tokenizer = rag.engine.tokenizer
    limits = Limits(model_id, max_question_tokens, rag.engine.max_context, max_tokens)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.close)  # the running answer ends, waiting ones are refused

    app = FastAPI(title="epic-rag", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics
    app.mount("/static", StaticFiles(directory=str(WEB)), name="static")

    def count_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        metrics.errors.labels(err.kind).inc()
        metrics.requests.labels(str(err.status)).inc()
        headers = {"Retry-After": str(RETRY_AFTER_S)} if err.status == 503 else None
        if err.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse((WEB / "index.html").read_text(encoding="utf-8"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        tiers = {b.name: "up" if getattr(b, "available", True) else "down" for b in rag.engine.store.backends}
        return {"status": "ok", "model": model_id, "queue_depth": worker.depth, "kv_tiers": tiers}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "epic-rag"}],
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "the body is not valid JSON") from None
        chat, stream = parse_chat_request(body, limits, count_tokens)
        completion = Completion(model_id)
        if stream:
            events: asyncio.Queue = asyncio.Queue()
            job = _submit(chat, *_bridge(events))  # a full queue is a 503 before the stream starts
            return StreamingResponse(_stream(job, events, completion), media_type="text/event-stream")
        report = await _whole(chat)
        metrics.requests.labels("200").inc()
        return JSONResponse(completion.whole(report))

    def _submit(chat: ChatRequest, on_delta, finish) -> Job:
        def finished(report: AnswerReport | None, error: BaseException | None) -> None:
            if report is not None:
                metrics.record(report)  # cancelled answers too: what they computed was spent
            finish(report, error)

        job = Job(run=lambda cancel: answer(rag, chat, on_delta, cancel, history_tokens), finish=finished)
        try:
            worker.submit(job)
        except QueueFull as err:
            raise APIError(503, f"the server is busy ({err}); retry in a few seconds", code="queue_full") from None
        return job

    async def _whole(chat: ChatRequest) -> AnswerReport:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def finish(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, done, result, error)

        job = _submit(chat, lambda _delta: None, finish)
        try:
            report = await done
        except ValueError as err:  # what the engine refuses (a prompt over the model's window, ...)
            raise APIError(400, str(err)) from None
        except Exception as err:
            logger.exception("a request failed")
            raise APIError(500, f"the answer failed: {err}", kind="server_error") from None
        finally:
            job.cancel.set()  # a client that went away frees its slot
        return report

    def _bridge(events: asyncio.Queue):
        """(on_delta, finish) callbacks that hand the worker thread's output to the event loop."""
        loop = asyncio.get_running_loop()

        def put(item: tuple) -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(events.put_nowait, item)

        return (lambda delta: put(("delta", delta))), (lambda result, error: put(("end", result, error)))

    async def _stream(job: Job, events: asyncio.Queue, completion: Completion) -> AsyncIterator[str]:
        try:
            yield _sse(completion.chunk({"role": "assistant", "content": ""}))
            while True:
                item = await events.get()
                if item[0] == "delta":
                    yield _sse(completion.chunk({"content": item[1]}))
                    continue
                _, report, error = item
                if error is not None:
                    logger.error("a streamed request failed", exc_info=error)
                    metrics.errors.labels("server_error").inc()
                    metrics.requests.labels("500").inc()
                    yield _sse(APIError(500, f"the answer failed: {error}", kind="server_error").body())
                elif report is not None:
                    metrics.requests.labels("200").inc()
                    yield _sse(completion.last_chunk(report))
                yield "data: [DONE]\n\n"
                return
        finally:
            job.cancel.set()  # the client went away, or the answer is done: either way the slot is free

    return app


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    elif result is None:
        future.set_exception(RuntimeError("the request was cancelled"))
    else:
        future.set_result(result)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
