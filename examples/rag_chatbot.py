"""A RAG chatbot over a documents folder, built from the four LlamaIndex pieces of epic-rag.

    python examples/rag_chatbot.py                       # sample documents, default offline model
    python examples/rag_chatbot.py --docs my_docs --model smollm2-135m-instruct

It indexes the folder once (KVSplit chunks, chunk KV stored by EpicKVPrecompute,
FAISS vectors), then answers questions typed at the prompt, streaming each answer and
printing its sources, time to first token and how much KV was reused.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from epic_rag.integrations.llama_index import current_handoff
from epic_rag.integrations.llama_index.app import MANIFEST, build_index, open_index

from epic_rag import DEFAULT_MODEL
from epic_rag.offline import cache_dir

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default=str(HERE / "sample_docs"), help="documents folder")
    parser.add_argument("--index", default=str(cache_dir() / "example_index"), help="index folder (built on first run)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()

    if (Path(args.index) / MANIFEST).is_file():
        app = open_index(args.index, model=args.model)
    else:
        app = build_index(args.docs, args.index, model=args.model)
    query_engine = app.query_engine(streaming=True)
    print("Ask about the documents (empty line to quit).")
    while question := input("you> ").strip():
        response = query_engine.query(question)
        print("bot> ", end="", flush=True)
        for delta in response.response_gen:
            print(delta, end="", flush=True)
        print()
        handoff = current_handoff()
        call = handoff.calls[0]
        print(f"  sources: {', '.join(n.node.metadata['file_name'] for n in response.source_nodes)}")
        print(
            f"  ttft {call.ttft_s:.2f} s, chunks linked {call.chunks_matched}/{call.chunks_handed}, "
            f"recomputed {call.tokens_recomputed} of {call.tokens_total} tokens"
        )


if __name__ == "__main__":
    main()
