"""`epic-rag serve`: the OpenAI-compatible HTTP server over an index, with a web chat page."""
