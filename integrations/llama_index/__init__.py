"""LlamaIndex integration (work in progress)."""
