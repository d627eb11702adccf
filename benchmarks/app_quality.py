"""End-to-end quality of `ask` and `chat`: answered right, and "not in the documents" said, per policy.

    python benchmarks/app_quality.py --docs examples/sample_docs \
        --questions benchmarks/qa/sample_docs_questions.jsonl benchmarks/qa/sample_docs_unanswerable.jsonl \
        --conversations benchmarks/qa/sample_docs_conversations.jsonl --policies full,default \
        --out benchmarks/results/app-quality-sample-qwen

Builds the index of --docs (in --index, reused while the documents and model are the same),
then runs every question through the query engine and every conversation through a chat
session. Prints a table; --out also writes results.json (summaries and every answer).
"""

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from epic_rag.integrations.llama_index.app import (
    CHAT_RETRIEVAL,
    build_index,
    index_is_current,
    open_index,
    read_documents,
)
from epic_rag.integrations.llama_index.app_quality import TABLE_HEAD, evaluate, read_conversations, read_questions

from epic_rag import DEFAULT_MODEL
from epic_rag.offline import cache_dir


def main(args: argparse.Namespace) -> int:
    documents = read_documents(args.docs, progress=True)
    index = args.index or str(cache_dir() / "app-quality" / f"{Path(args.docs).name}-{args.model}")
    if index_is_current(index, documents, args.model):
        app = open_index(index, model=args.model, max_new_tokens=args.max_new_tokens, top_k=args.top_k)
    else:
        app = build_index(args.docs, index, model=args.model, documents=documents, top_k=args.top_k)
        app.llm.max_new_tokens = args.max_new_tokens
    policies = [app.engine.default_policy if p == "default" else p for p in args.policies.split(",") if p.strip()]
    questions = [c for path in args.questions for c in read_questions(path)]
    conversations = read_conversations(args.conversations) if args.conversations else []
    summaries, answers = evaluate(app, policies, questions, conversations, tuple(args.chat_retrieval))
    table = "\n".join([f"model {args.model}, top-k {args.top_k}, documents {args.docs}", "", TABLE_HEAD])
    table += "\n" + "\n".join(s.row() for s in summaries)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.md").write_text(table + "\n")
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        payload = {"settings": settings, "summaries": [asdict(s) for s in summaries], "answers": answers}
        (out / "results.json").write_text(json.dumps(payload, indent=1, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", required=True, help="documents folder")
    parser.add_argument("--index", help="index folder (default: one under the epic-rag cache)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--questions", nargs="*", default=[], help="question files, asked one by one (ask)")
    parser.add_argument("--conversations", help="conversation file, each run in one chat session")
    parser.add_argument("--policies", default="full,default", help="comma-separated; 'default' is the model's")
    parser.add_argument("--chat-retrieval", nargs="+", default=["latest"], choices=CHAT_RETRIEVAL)
    parser.add_argument("--top-k", type=int, default=3, help="chunks retrieved (default 3, as the CLI)")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--out", help="folder for results.md and results.json")
    sys.exit(main(parser.parse_args()))
