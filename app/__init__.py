"""The RAG application: documents, index folders and their manifest, chat, and the `epic-rag` commands over them.

Modules, in the order a query meets them: `documents` reads a folder; `index` builds an index
folder from it and reopens it as a `RagApp` (query and chat engines); `manifest` is the
record in that folder of what built it; `calibrate` measures policies on an index and records
the best; `chat` and `report` are the terminal chat loop and the lines printed after each
answer; `answering` answers one request of the server; `cli` holds the `epic-rag index | ask |
chat | calibrate` commands. `prompts`, `history`, `settings` and `vector_stores` hold what
those share.
"""
