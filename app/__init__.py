"""The RAG application: documents, index folders and their manifest, chat, and the `epic-rag` commands over them."""
