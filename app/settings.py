"""Defaults of the RAG application that its command line needs before anything heavy loads."""

CHAT_RETRIEVAL = ("latest", "condense")  # what chat retrieves on: the latest message, or a condensed question
HISTORY_TOKENS = 768  # earlier chat turns kept in the prompt (recomputed every turn)
DEFAULT_CHUNKING = {"target_tokens": 256, "max_tokens": 384, "min_tokens": 48}  # KVSplit sizes, LLM tokens
