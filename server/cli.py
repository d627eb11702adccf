"""`epic-rag serve`: start the OpenAI-compatible server over an index.

Registered through the ``epic_rag.cli`` entry-point group; FastAPI, uvicorn and the model
load only when the command runs (the serve extra: pip install 'epic-rag[serve]').
"""

from __future__ import annotations

import argparse
import os

from epic_rag.app.cli import (
    MAX_QUESTION_TOKENS,
    add_device_args,
    add_kv_args,
    add_ttft_target,
    model_arg,
    open_app,
    policy_arg,
)

from epic_rag.batch_limits import DEFAULT_MAX_BATCH, DEFAULT_PIECE_S
from epic_rag.cli import argparse_type, require_extra

API_KEY_ENV = "EPIC_RAG_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    subparsers.add_parser(
        "serve", help="OpenAI-compatible chat server over an index, with a web chat at /", configure=_serve_args
    )


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="an index built by `epic-rag index`")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--policy", type=policy_arg, default=None, help="default recompute policy (a request may ask for another)"
    )
    add_ttft_target(p)
    p.add_argument(
        "--model", type=model_arg, default=None, help="must be the model that built the index (default: that one)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV) or None,
        help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}); needed to bind beyond 127.0.0.1",
    )
    p.add_argument("--model-id", default=None, help="the model id clients use (default: the index folder's name)")
    p.add_argument("--top-k", type=int, default=3, help="chunks to retrieve unless a request says (default 3)")
    p.add_argument("--max-question-tokens", type=int, default=MAX_QUESTION_TOKENS)
    p.add_argument("--max-tokens", type=int, default=1024, help="the most answer tokens a request may ask for")
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait; more get 503 (default 16)")
    p.add_argument(
        "--max-batch",
        type=argparse_type(_at_least_one),
        default=DEFAULT_MAX_BATCH,
        help=f"answers decoded together, one token each per forward (default {DEFAULT_MAX_BATCH}, measured on 2 cores)",
    )
    p.add_argument(
        "--prefill-piece-ms",
        type=argparse_type(_positive_ms),
        default=DEFAULT_PIECE_S * 1000,
        help="a new prompt's prefill runs this long between two steps of the answers streaming "
        f"(default {DEFAULT_PIECE_S * 1000:.0f})",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="torch threads of the engine's compute (default: the CPU count)"
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="let web pages from this origin (e.g. http://localhost:3000) call the API; repeat for several "
        "(default: none, browsers may not)",
    )
    add_kv_args(p)
    add_device_args(p)
    p.set_defaults(func=_serve)


def _at_least_one(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def _positive_ms(text: str) -> float:
    try:
        ms = float(text)
    except ValueError:
        ms = float("nan")
    if not ms > 0:
        raise ValueError(f"must be a positive number of milliseconds, got {text!r}")
    return ms


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    require_extra("serve", "serve", "fastapi", "uvicorn", "prometheus_client", "llama_index.core")
    import uvicorn
    from epic_rag.app.live_index import LiveIndex
    from epic_rag.app.manifest import read_manifest

    from .api_server import check_bind, create_app

    check_bind(args.host, args.api_key)  # before anything loads
    manifest = read_manifest(args.index)  # a bad index folder fails before the model loads
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    rag = open_app(args, manifest)
    live = LiveIndex(rag, reopen=lambda changed: open_app(args, changed, engine=rag.engine))
    model_id = args.model_id or Path(args.index).resolve().name
    app = create_app(
        live,
        model_id,
        api_key=args.api_key,
        max_waiting=args.queue_size,
        max_question_tokens=args.max_question_tokens,
        max_tokens=args.max_tokens,
        cors_origins=args.cors_origin,
        max_batch=args.max_batch,
        prefill_piece_s=args.prefill_piece_ms / 1000,
    )
    print(
        f"epic-rag serve: model id {model_id!r}, policy {rag.llm.policy}, up to {args.max_batch} answers decoded "
        f"together, on http://{args.host}:{args.port}/",
        flush=True,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
