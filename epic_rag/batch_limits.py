"""The batching scheduler's defaults, measured (`epic-rag bench serve`, 2 cores; RESULTS.md);
apart from `scheduler` so that command-line help shows them without importing torch."""

DEFAULT_MAX_BATCH = 8  # answers decoded together
DEFAULT_PIECE_S = 0.5  # prefill time between two steps of the answers streaming
