"""A RAG chatbot over a documents folder, built from the four LlamaIndex pieces of epic-rag.

    python examples/rag_chatbot.py                       # sample documents, default offline model
    python examples/rag_chatbot.py --docs my_docs --model smollm2-135m-instruct

It indexes the folder (KVSplit chunks, chunk KV stored by EpicKVPrecompute, FAISS
vectors) and reuses that index while the documents and the model stay the same, then
answers questions typed at the prompt, streaming each answer and printing its sources,
time to first token and how much KV was reused. /quit, /exit, Ctrl-D or Ctrl-C end it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epic_rag.integrations.llama_index import current_handoff
from epic_rag.app.index import build_index, index_is_current, open_index, read_documents

from epic_rag import DEFAULT_MODEL
from epic_rag.offline import cache_dir

HERE = Path(__file__).resolve().parent
QUIT = {"/quit", "/exit"}


def answer(query_engine, question: str) -> None:
    response = query_engine.query(question)
    print("bot> ", end="", flush=True)
    for delta in response.response_gen:
        print(delta, end="", flush=True)
    print()
    call = current_handoff().calls[0]
    print(f"  sources: {', '.join(n.node.metadata['file_name'] for n in response.source_nodes)}")
    print(
        f"  ttft {call.ttft_s:.2f} s, chunks linked {call.chunks_matched}/{call.chunks_handed}, "
        f"recomputed {call.tokens_recomputed} of {call.tokens_total} tokens"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default=str(HERE / "sample_docs"), help="documents folder")
    parser.add_argument("--index", default=str(cache_dir() / "example_index"), help="index folder (built when needed)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()

    documents = read_documents(args.docs, progress=True)
    if index_is_current(args.index, documents, args.model):
        app = open_index(args.index, model=args.model)
    else:
        print(f"indexing {args.docs} (new, or the documents or the model changed since {args.index} was built)")
        app = build_index(args.docs, args.index, model=args.model, documents=documents)
    query_engine = app.query_engine(streaming=True)
    print("Ask about the documents. /quit, /exit or Ctrl-D to leave.")
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if question in QUIT:
            return 0
        if question:
            answer(query_engine, question)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; nothing half-written was kept", file=sys.stderr)
        sys.exit(130)
