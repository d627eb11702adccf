"""End-to-end answer quality of the RAG app: `ask` and `chat`, per policy, on question files.

A question counts as right when every expected fact appears in the answer (any of its
spellings, SQuAD-normalised) and the answer does not decline; a question the documents do
not answer counts as right only when the answer declines. Chat runs each conversation's
turns in one chat session, so follow-ups depend on the history and on retrieval.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from epic_rag.app.cli import compile_arg
from epic_rag.app.index import CHAT_RETRIEVAL, RagApp, build_index, index_is_current, open_index, read_documents
from epic_rag.integrations.llama_index.handoff import CallReport, current_handoff, set_handoff
from epic_rag.integrations.llama_index.llm import EpicLLM
from tqdm.auto import tqdm

from epic_rag import DEFAULT_MODEL
from epic_rag.offline import builtin_compile, cache_dir

from .devices import add_device_arguments
from .scoring import contains_answer

# Phrases by which an answer says the documents lack what was asked.
DECLINE_PATTERNS = re.compile(
    r"\b(do|does|did) not (say|mention|specify|state|contain|provide|include|give)"
    r"|\bnot (mentioned|specified|stated|provided|given|available|included|in the (documents|context))"
    r"|\bno information\b|\b(do|does) not know\b|\bcannot (answer|find|determine)\b|\bunknown\b",
    re.IGNORECASE,
)


def declines(answer: str) -> bool:
    """Whether an answer says the documents do not hold the answer."""
    return bool(DECLINE_PATTERNS.search(answer.replace("’", "'").replace("n't", " not")))


@dataclass
class Turn:
    question: str
    expect: list[list[str]]  # facts, each a list of accepted spellings; empty: the documents do not say

    @property
    def answerable(self) -> bool:
        return bool(self.expect)


@dataclass
class Conversation:
    id: str
    turns: list[Turn]


@dataclass
class TurnResult:
    conversation: str
    turn: int
    question: str
    answer: str
    answerable: bool
    right: bool
    ttft_s: float  # the answer call's
    llm_calls: int
    tokens_recomputed: int  # over the turn's LLM calls
    tokens_total: int


def judge(answer: str, turn: Turn) -> bool:
    if not turn.answerable:
        return declines(answer)
    return not declines(answer) and all(any(contains_answer(answer, s) for s in fact) for fact in turn.expect)


def read_questions(path: str | Path) -> list[Conversation]:
    """One-turn conversations from a QA question file (`answers`: accepted spellings of one fact;
    no `answers`: a question the documents do not answer)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [Conversation(r["id"], [Turn(r["question"], [r["answers"]] if r.get("answers") else [])]) for r in rows]


def read_conversations(path: str | Path) -> list[Conversation]:
    """Conversations: {"id", "turns": [{"question", "expect": [[spellings of fact 1], ...]}]}."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [Conversation(r["id"], [Turn(t["question"], t["expect"]) for t in r["turns"]]) for r in rows]


def with_policy(app: RagApp, policy: str) -> RagApp:
    """The same index and engine answering under another policy."""
    llm = EpicLLM(app.engine, model_name=app.llm.model_name, policy=policy, max_new_tokens=app.llm.max_new_tokens)
    return RagApp(app.index, llm, app.embed, top_k=app.top_k)


def run_ask(app: RagApp, conversations: list[Conversation], progress: bool = True) -> list[TurnResult]:
    """Each turn asked on its own, as `epic-rag ask` does."""
    results = []
    query_engine = app.query_engine()
    items = [(c, i, t) for c in conversations for i, t in enumerate(c.turns)]
    for conv, i, turn in tqdm(items, desc="ask", unit="question", disable=not progress):
        set_handoff(None)
        answer = str(query_engine.query(turn.question)).strip()
        results.append(_result(conv, i, turn, answer))
    return results


def run_chat(
    app: RagApp, conversations: list[Conversation], retrieval: str = "latest", progress: bool = True
) -> list[TurnResult]:
    """Each conversation in one chat session, turn after turn, as `epic-rag chat` does."""
    results = []
    for conv in tqdm(conversations, desc=f"chat ({retrieval})", unit="conversation", disable=not progress):
        chat = app.chat_engine(retrieval=retrieval)
        for i, turn in enumerate(conv.turns):
            set_handoff(None)
            answer = str(chat.chat(turn.question)).strip()
            condense = getattr(chat, "condense_call", None)
            results.append(_result(conv, i, turn, answer, [condense] if condense else []))
    return results


def _result(conv: Conversation, i: int, turn: Turn, answer: str, before: list[CallReport] | None = None) -> TurnResult:
    """The turn's result; `before`: model calls the turn made before retrieval (condensing)."""
    handoff = current_handoff()
    calls = handoff.calls if handoff is not None else []
    if not calls:
        raise RuntimeError(f"no LLM call was recorded for {conv.id} turn {i}: is the EpicKVPostprocessor in place?")
    return TurnResult(
        conversation=conv.id,
        turn=i,
        question=turn.question,
        answer=answer,
        answerable=turn.answerable,
        right=judge(answer, turn),
        ttft_s=calls[-1].ttft_s,
        llm_calls=len(before or []) + len(calls),
        tokens_recomputed=sum(c.tokens_recomputed for c in (before or []) + calls),
        tokens_total=sum(c.tokens_total for c in (before or []) + calls),
    )


@dataclass
class Summary:
    mode: str
    policy: str
    answerable_right: int
    answerable: int
    declined_right: int
    unanswerable: int
    ttft_s_median: float
    recomputed_mean: float
    seconds: float

    def row(self) -> str:
        return (
            f"| {self.mode} | {self.policy} | {self.answerable_right}/{self.answerable} | "
            f"{self.declined_right}/{self.unanswerable} | {self.ttft_s_median:.2f} | {self.recomputed_mean:.0f} |"
        )


def summarise(mode: str, policy: str, results: list[TurnResult], seconds: float) -> Summary:
    answerable = [r for r in results if r.answerable]
    unanswerable = [r for r in results if not r.answerable]
    return Summary(
        mode=mode,
        policy=policy,
        answerable_right=sum(r.right for r in answerable),
        answerable=len(answerable),
        declined_right=sum(r.right for r in unanswerable),
        unanswerable=len(unanswerable),
        ttft_s_median=statistics.median(r.ttft_s for r in results),
        recomputed_mean=statistics.fmean(r.tokens_recomputed for r in results),
        seconds=seconds,
    )


TABLE_HEAD = (
    "| mode | policy | answered right | 'not in the documents' said | TTFT s (median) | recomputed tokens (mean) |\n"
    "|---|---|---:|---:|---:|---:|"
)


def evaluate(
    app: RagApp,
    policies: list[str],
    questions: list[Conversation],
    conversations: list[Conversation],
    chat_retrievals: tuple[str, ...] = ("latest",),
    progress: bool = True,
) -> tuple[list[Summary], dict[str, list[dict]]]:
    """Summaries per (mode, policy) and every answer, keyed "mode/policy"."""
    summaries, answers = [], {}
    for policy in policies:
        policy_app = with_policy(app, policy)
        chat_modes = [f"chat-{r}" for r in chat_retrievals] if conversations else []  # no conversations: ask only
        for mode in ("ask", *chat_modes):
            start = time.perf_counter()
            if mode == "ask":
                results = run_ask(policy_app, questions, progress)
            else:
                results = run_chat(policy_app, conversations, mode.removeprefix("chat-"), progress)
            summaries.append(summarise(mode, policy_app.llm.policy, results, time.perf_counter() - start))
            answers[f"{mode}/{policy_app.llm.policy}"] = [asdict(r) for r in results]
    return summaries, answers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--docs", required=True, help="documents folder")
    parser.add_argument("--index", help="index folder (default: one under the epic-rag cache)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--questions", nargs="*", default=[], help="question files, asked one by one (ask)")
    parser.add_argument("--conversations", help="conversation file, each run in one chat session")
    parser.add_argument("--policies", default="full,default", help="comma-separated; 'default' is the model's")
    parser.add_argument("--chat-retrieval", nargs="+", default=["latest"], choices=CHAT_RETRIEVAL)
    parser.add_argument("--top-k", type=int, default=3, help="chunks retrieved (default 3, as the CLI)")
    parser.add_argument(
        "--compile", type=compile_arg, default=None, metavar="MODE", help="compile mode of the index it builds"
    )
    parser.add_argument("--max-new-tokens", type=int, default=96)
    add_device_arguments(parser)
    parser.add_argument("--out", help="folder for results.md and results.json")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    documents = read_documents(args.docs, progress=True)
    args.compile = args.compile or builtin_compile(args.model) or "alone"
    name = f"{Path(args.docs).name}-{args.model}" + ("" if args.compile == "alone" else f"-{args.compile}")
    index = args.index or str(cache_dir() / "app-quality" / name.replace(":", "-"))
    if index_is_current(index, documents, args.model, args.compile):
        app = open_index(
            index, model=args.model, max_new_tokens=args.max_new_tokens, top_k=args.top_k, device=args.device
        )
    else:
        app = build_index(
            args.docs, index, model=args.model, documents=documents, top_k=args.top_k, compile=args.compile,
            device=args.device, dtype=args.dtype,
        )  # fmt: skip
        app.llm.max_new_tokens = args.max_new_tokens
    policies = [app.engine.default_policy if p == "default" else p for p in args.policies.split(",") if p.strip()]
    questions = [c for path in args.questions for c in read_questions(path)]
    conversations = read_conversations(args.conversations) if args.conversations else []
    summaries, answers = evaluate(app, policies, questions, conversations, tuple(args.chat_retrieval))
    head = f"model {args.model}, top-k {args.top_k}, documents {args.docs}, chunk KV compiled {args.compile}"
    table = "\n".join([head, "", TABLE_HEAD])
    table += "\n" + "\n".join(s.row() for s in summaries)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table + "\n")
        settings = {k: v for k, v in vars(args).items() if k != "out" and not callable(v)}
        payload = {"settings": settings, "summaries": [asdict(s) for s in summaries], "answers": answers}
        (out / "results.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return 0
