"""The FastAPI app of `epic-rag serve`: its routes, API-key check and OpenAI-style errors.

`/v1/models` lists the index as two models (with retrieval, and `:chat` without),
`/v1/chat/completions` and `/v1/completions` answer with retrieval, KV linking and the policy
done here (`serving_chat`), `/health` and `/metrics` (Prometheus, `metrics`) are for
operators, and `/` is the web chat (`web/`). One model in memory; requests wait in a bounded
queue (`worker`) and up to `max_batch` answers decode together (the engine's batching
scheduler). Browsers on `cors_origins` may call it; any other path is an OpenAI-style 404.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources

from epic_rag.app.index import HISTORY_TOKENS
from epic_rag.app.live_index import LiveIndex
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from epic_rag.batch_limits import DEFAULT_MAX_BATCH, DEFAULT_PIECE_S

from .metrics import Metrics
from .protocol import APIError, HealthResponse, ModelCard, ModelList
from .serving_chat import Limits, OpenAIServing
from .worker import EngineWorker

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
RETRY_AFTER_S = 5
WEB = resources.files(__package__) / "web"


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to listen beyond this machine without a key."""
    if host not in LOOPBACK and not api_key:
        raise ValueError(
            f"refusing to listen on {host} without an API key: anyone who can reach the port could use the model "
            "and read the indexed documents. Pass --api-key KEY (or set EPIC_RAG_API_KEY), or bind 127.0.0.1"
        )


def create_app(
    live: LiveIndex,
    model_id: str,
    api_key: str | None = None,
    max_waiting: int = 16,
    max_question_tokens: int = 1024,
    max_tokens: int = 1024,
    history_tokens: int = HISTORY_TOKENS,
    cors_origins: list[str] | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    prefill_piece_s: float = DEFAULT_PIECE_S,
) -> FastAPI:
    """The FastAPI app serving the index `live` follows under the model id `model_id` (an update of
    the index is picked up between requests, over the same engine, which batches while it runs)."""
    rag = live.current()
    scheduler = rag.engine.start_batching(max_batch, prefill_piece_s)
    worker = EngineWorker(max_waiting, runners=max_batch)
    metrics = Metrics(worker)
    metrics.watch_store(rag.engine.store)
    metrics.watch_scheduler(scheduler)
    limits = Limits(model_id, max_question_tokens, rag.engine.max_context, max_tokens)
    serving = OpenAIServing(live, limits, worker, metrics, history_tokens)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await asyncio.to_thread(worker.close)  # running answers end, waiting ones are refused
        rag.engine.stop_batching()

    app = FastAPI(title="epic-rag", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker, app.state.metrics = worker, metrics
    app.mount("/static", StaticFiles(directory=str(WEB)), name="static")
    if cors_origins:  # off by default: only the origins named may call the API from a browser
        app.add_middleware(
            CORSMiddleware,
            allow_origins=cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = (
                f"no route {request.method} {request.url.path}: see /v1/models, /v1/chat/completions, /v1/completions"
            )
            return await api_error(request, APIError(404, message, code="not_found"))
        if err.status_code == 405:
            return await api_error(request, APIError(405, f"{request.method} is not allowed on {request.url.path}"))
        return await api_error(request, APIError(err.status_code, str(err.detail)))

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        metrics.outcome(err.status, err.kind)
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
    async def health() -> HealthResponse:
        tiers = {b.name: "up" if getattr(b, "available", True) else "down" for b in rag.engine.store.backends}
        await asyncio.to_thread(live.current)  # an updated index is reopened here too, so operators see it at once
        return HealthResponse(
            model=model_id, queue_depth=worker.depth, kv_tiers=tiers, index_generation=live.generation
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        text, content_type = metrics.exposition()
        return Response(text, media_type=content_type)

    @app.get("/v1/models")
    async def models(request: Request) -> ModelList:
        authorize(request)
        return ModelList(data=[ModelCard(id=m) for m in limits.model_ids])

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request) -> ModelCard:
        authorize(request)
        if model not in limits.model_ids:
            raise APIError(404, f"the model {model!r} does not exist", "model", "model_not_found")
        return ModelCard(id=model)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        return await serving.create_chat_completion(await request.body(), request.is_disconnected)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        return await serving.create_completion(await request.body(), request.is_disconnected)

    return app
