"""LlamaIndex integration of epic-rag.

    from epic_rag.integrations.llama_index import (
        EpicLLM, EpicKVPostprocessor, EpicKVPrecompute, KVSplitNodeParser)

KVSplitNodeParser splits documents into token-bounded semantic chunks, EpicKVPrecompute
stores each node's KV at indexing time, EpicKVPostprocessor makes sure retrieved
nodes are cached and hands them to EpicLLM, which links their KV into the prompt.
"""

from .handoff import CallReport, Handoff, current_handoff
from .llm import EpicLLM, last_call
from .node_parser import KVSplitNodeParser
from .postprocessor import EpicKVPostprocessor
from .precompute import EpicKVPrecompute

__all__ = [
    "CallReport",
    "EpicKVPostprocessor",
    "EpicKVPrecompute",
    "EpicLLM",
    "Handoff",
    "KVSplitNodeParser",
    "current_handoff",
    "last_call",
]
