"""`epic-rag bench serve`: concurrent clients against a live `epic-rag serve`, per policy.

Starts the server on a free loopback port, then for each policy and each client count sends
the questions over HTTP (streaming), N clients at a time. TTFT is measured at the client:
time to the first answer token, queueing included, as a user feels it. Every answer is
checked against the same question's answer with one client, so a lost or mixed-up answer
is reported, not averaged away.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from epic_rag.server.process import ServeProcess
from tqdm.auto import tqdm

from epic_rag.batch_limits import DEFAULT_MAX_BATCH, DEFAULT_PIECE_S

from .devices import add_device_arguments

DEFAULT_QUESTIONS = [
    "What is the warranty on a Skylark buoy?",
    "What does the Skylark S3 cost?",
    "How long does a firmware update take?",
    "Who founded Norrvik Instruments?",
    "How much does the S3 weigh without its mooring?",
    "When does the support desk answer the phone?",
    "What did firmware 4.2 add?",
    "How many people does Norrvik employ?",
]


@dataclass
class Reply:
    question: str
    text: str
    status: int
    ttft_s: float  # client side: request sent -> first answer token
    latency_s: float  # request sent -> [DONE]
    server_ttft_s: float  # the engine's own TTFT, from the final chunk
    tokens_prompt: int
    tokens_generated: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Answer tokens after the first, per second after the first (the client's streaming rate)."""
        streaming = self.latency_s - self.ttft_s
        return (self.tokens_generated - 1) / streaming if self.tokens_generated > 1 and streaming > 0 else 0.0


@dataclass
class Row:
    policy: str
    clients: int
    requests: int
    ok: int
    mismatched: int
    answers_per_min: float
    ttft_p50: float
    ttft_p95: float
    latency_p50: float
    latency_p95: float
    server_ttft_p50: float
    prompt_tokens_mean: float
    tokens_per_s_p50: float  # each client's streaming rate after its first token
    answer_tokens_mean: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--index", required=True, metavar="INDEX_DIR", help="an index built by `epic-rag index`")
    parser.add_argument("--policies", default="default,full", help="comma-separated; 'default' is the server's")
    parser.add_argument("--clients", default="1,2,4,8", help="concurrent clients per run (default 1,2,4,8)")
    parser.add_argument("--questions", help="a question file (JSON lines with 'question'); default: 8 built in")
    parser.add_argument("--requests", type=int, default=16, help="requests per run, spread over the clients")
    parser.add_argument("--top-k", type=int, default=8, help="chunks retrieved per question (default 8)")
    parser.add_argument("--max-tokens", type=int, default=64, help="answer tokens per request (default 64)")
    parser.add_argument(
        "--natural-length",
        action="store_true",
        help="let answers end at their end token (default: every answer is --max-tokens long, as serving "
        "benchmarks measure decoding; `min_tokens` in each request)",
    )
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (default: CPU count)")
    parser.add_argument(
        "--max-batch", type=int, default=None, help="the server's --max-batch (default: the server's default)"
    )
    parser.add_argument(
        "--prefill-piece-ms",
        type=float,
        default=None,
        help="the server's --prefill-piece-ms (default: the server's default)",
    )
    add_device_arguments(parser)
    parser.add_argument("--out", help="folder for results.md, results.json and serve.png")
    parser.set_defaults(func=main)


def register(kinds: argparse._SubParsersAction) -> None:
    add_arguments(kinds.add_parser("serve", help="concurrent clients through the HTTP server, per policy"))


def main(args: argparse.Namespace) -> int:
    questions = _questions(args.questions)[: args.requests]  # each run sends these, so each has a reference
    clients = [int(c) for c in args.clients.split(",")]
    options = (
        ("threads", args.threads),
        ("max-batch", args.max_batch),
        ("prefill-piece-ms", args.prefill_piece_ms),
        ("device", args.device),
        ("dtype", args.dtype),
    )
    placed = [f"--{k}={v}" for k, v in options if v]
    with ServeProcess(args.index, "--queue-size", "64", *placed) as server:
        url = server.url
        model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
        rows, server_policy = [], None
        for policy in [p.strip() for p in args.policies.split(",") if p.strip()]:
            extra = {} if policy == "default" else {"policy": policy}
            if not args.natural_length:
                extra["min_tokens"] = args.max_tokens
            ask = _Asker(url, model, extra, args.top_k, args.max_tokens)
            alone = {q: ask(q) for q in tqdm(questions, desc=f"{policy}: reference answers", unit="question")}
            server_policy = server_policy or _policy_of(url, model, args)
            for n in clients:
                batch = [questions[i % len(questions)] for i in range(args.requests)]
                start = time.perf_counter()
                with ThreadPoolExecutor(n) as pool:
                    replies = list(tqdm(pool.map(ask, batch), total=len(batch), desc=f"{policy} x{n}", unit="request"))
                rows.append(_row(policy, n, replies, alone, time.perf_counter() - start))
    table = format_table(rows, args, server_policy)
    print(table)
    if args.out:
        _write(Path(args.out), rows, table, args)
    return 0


def _policy_of(url: str, model: str, args: argparse.Namespace) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": "policy?"}], "max_tokens": 1}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()["epic_rag"]["policy"]


class _Asker:
    """One streamed request, timed at the client."""

    def __init__(self, url: str, model: str, extra: dict, top_k: int, max_tokens: int) -> None:
        self.url, self.model, self.extra, self.top_k, self.max_tokens = url, model, extra, top_k, max_tokens

    def __call__(self, question: str) -> Reply:
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": self.max_tokens,
            "stream": True,
            "top_k": self.top_k,
            **self.extra,
        }
        start = time.perf_counter()
        first, text, report = None, "", {}
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, timeout=600) as response:
            if response.status_code != 200:
                return Reply(question, "", response.status_code, 0.0, time.perf_counter() - start, 0.0, 0)
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                delta = chunk["choices"][0]["delta"].get("content") or ""
                if delta and first is None:
                    first = time.perf_counter() - start
                text += delta
                report = chunk.get("epic_rag", report)
        latency = time.perf_counter() - start
        return Reply(
            question,
            text,
            200,
            first or latency,
            latency,
            report.get("ttft_s", 0.0),
            report.get("tokens_prompt", 0),
            report.get("tokens_generated", 0),
        )


def _row(policy: str, clients: int, replies: list[Reply], alone: dict[str, Reply], seconds: float) -> Row:
    ok = [r for r in replies if r.status == 200]
    ttft = sorted(r.ttft_s for r in ok) or [0.0]
    latency = sorted(r.latency_s for r in ok) or [0.0]
    return Row(
        policy=policy,
        clients=clients,
        requests=len(replies),
        ok=len(ok),
        mismatched=sum(r.text != alone[r.question].text for r in ok),
        answers_per_min=60 * len(ok) / seconds,
        ttft_p50=statistics.median(ttft),
        ttft_p95=_p95(ttft),
        latency_p50=statistics.median(latency),
        latency_p95=_p95(latency),
        server_ttft_p50=statistics.median(r.server_ttft_s for r in ok) if ok else 0.0,
        prompt_tokens_mean=statistics.fmean(r.tokens_prompt for r in ok) if ok else 0.0,
        tokens_per_s_p50=statistics.median(r.tokens_per_s for r in ok) if ok else 0.0,
        answer_tokens_mean=statistics.fmean(r.tokens_generated for r in ok) if ok else 0.0,
    )


def _p95(values: list[float]) -> float:
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def format_table(rows: list[Row], args: argparse.Namespace, server_policy: str | None) -> str:
    head = (
        f"index {args.index}, top-k {args.top_k}, {'up to ' if args.natural_length else ''}{args.max_tokens} answer "
        f"tokens, {args.requests} requests per run, "
        f"max batch {args.max_batch or DEFAULT_MAX_BATCH}, prefill pieces of "
        f"{args.prefill_piece_ms or DEFAULT_PIECE_S * 1000:.0f} ms; "
        f"'default' = {server_policy}; TTFT and latency at the client (queueing included)\n\n"
        "| policy | clients | ok | mixed up | answers/min | TTFT p50 s | TTFT p95 s | latency p50 s | latency p95 s "
        "| engine TTFT p50 s | prompt tokens | tokens/s p50 |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    body = [
        f"| {r.policy} | {r.clients} | {r.ok}/{r.requests} | {r.mismatched} | {r.answers_per_min:.1f} | "
        f"{r.ttft_p50:.2f} | {r.ttft_p95:.2f} | {r.latency_p50:.2f} | {r.latency_p95:.2f} | "
        f"{r.server_ttft_p50:.2f} | {r.prompt_tokens_mean:.0f} | {r.tokens_per_s_p50:.1f} |"
        for r in rows
    ]
    return "\n".join([head, *body])


def _write(out: Path, rows: list[Row], table: str, args: argparse.Namespace) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table + "\n")
    settings = {k: v for k, v in vars(args).items() if k not in ("func", "out")}
    (out / "results.json").write_text(json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for policy in dict.fromkeys(r.policy for r in rows):
        mine = [r for r in rows if r.policy == policy]
        left.plot([r.clients for r in mine], [r.ttft_p50 for r in mine], marker="o", label=policy)
        right.plot([r.clients for r in mine], [r.answers_per_min for r in mine], marker="o", label=policy)
    left.set(xlabel="concurrent clients", ylabel="TTFT p50 at the client (s)", yscale="log")
    right.set(xlabel="concurrent clients", ylabel="answers per minute")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=120)


def _questions(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_QUESTIONS)
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r["question"] for r in rows]
