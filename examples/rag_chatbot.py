"""A RAG chatbot over a documents folder, or over an index `epic-rag index` built.

    python examples/rag_chatbot.py --index demo-index     # the index the README builds
    python examples/rag_chatbot.py                        # sample documents, default offline model
    python examples/rag_chatbot.py --docs my_docs --model smollm2-135m-instruct

With --index alone it opens that index with the model that built it. With a documents
folder (the sample one by default) it indexes the folder (KVSplit chunks, chunk KV stored
by EpicKVPrecompute, FAISS vectors) and reuses that index while the model stays the same,
updating it with the documents added, changed or removed since. Then it chats as
`epic-rag chat` does: each answer streams, a follow-up sees the conversation so far, and
after each answer come its sources, time to first token and what KV was reused. /reset
clears the conversation; /quit, /exit, Ctrl-D or Ctrl-C end it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from epic_rag.app.chat import chat_loop
from epic_rag.app.documents import read_documents
from epic_rag.app.index import RagApp, build_index, index_can_update, index_is_current, open_index

from epic_rag import DEFAULT_MODEL
from epic_rag.offline import cache_dir

SAMPLE_DOCS = Path(__file__).resolve().parent / "sample_docs"


def open_app(docs: str | None, index: str | None, model: str | None) -> RagApp:
    """The index at `index` as it is when no documents folder is given; else an index of `docs`
    (the sample documents by default), updated when the documents changed, built when the model did."""
    if docs is None and index is not None:
        return open_index(index, model=model)
    docs, index, model = docs or str(SAMPLE_DOCS), index or str(cache_dir() / "example_index"), model or DEFAULT_MODEL
    documents = read_documents(docs, progress=True)
    if index_is_current(index, documents, model):
        return open_index(index, model=model)
    if index_can_update(index, model):
        app = open_index(index, model=model)
        print(f"updating {index}: {app.refresh(docs, documents=documents, show_progress=True).summary()}")
        return app
    print(f"indexing {docs} (new, or the model changed since {index} was built)")
    return build_index(docs, index, model=model, documents=documents)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", default=None, help="documents folder (default: the sample documents)")
    parser.add_argument("--index", default=None, help="index folder: opened as it is, or built from --docs when given")
    parser.add_argument("--model", default=None, help=f"model (default: the index's, else {DEFAULT_MODEL})")
    args = parser.parse_args()

    app = open_app(args.docs, args.index, args.model)
    print("Ask about the documents. /reset clears the conversation; /quit, /exit or Ctrl-D to leave.")
    chat_loop(app.chat_engine())
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError) as err:
        print(f"rag_chatbot: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted; nothing half-written was kept", file=sys.stderr)
        sys.exit(130)
