"""Find the handed chunks inside a prompt and lay the prompt out for the engine.

The layout holds exactly the prompt's own tokens. A chunk is linked from the store
where the prompt's tokens equal the leading tokens of the chunk's stored entry
(its text plus the engine's separator): all of them when the prompt continues with
the separator, all but the last one or two when it continues otherwise (tokenizers
merge punctuation with the newlines after it), and the leading part of a chunk the
synthesizer truncated. Text before the first chunk is the cached prefix unless it
holds the query (then it is a one-off and computed); everything else is computed.
A chunk that cannot be found is never guessed: it is counted as unmatched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from epic_rag import EpicEngine, PromptLayout
from epic_rag.layout import Kind

ANCHOR_CHARS = 64  # how much of a chunk's start locates a truncated chunk
MIN_PARTIAL_SHARE = 0.25  # a truncated chunk must keep at least this share of its text
MIN_LINK_TOKENS = 8  # shorter common runs are not worth linking


@dataclass
class Plan:
    layout: PromptLayout
    chunks_handed: int
    chunks_matched: int


@dataclass(frozen=True)
class _Span:
    start: int  # token index in the prompt
    ids: torch.Tensor  # the linked tokens (a leading part of the entry's ids)
    key: str  # store key of the whole entry
    entry_ids: torch.Tensor  # the whole entry's ids (what is compiled if the store lacks it)


def tokenize_prompt(
    engine: EpicEngine, prompt: str, add_special_tokens: bool
) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The prompt's token ids and each token's character span."""
    enc = engine.tokenizer(prompt, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return torch.tensor(enc["input_ids"], dtype=torch.int64), [tuple(o) for o in enc["offset_mapping"]]


def plan_layout(
    engine: EpicEngine,
    prompt: str,
    chunks: list[str],
    add_special_tokens: bool,
    query: str | None = None,
    keys: list[str | None] | None = None,
) -> Plan:
    """Layout of `prompt` with every handed chunk it contains linked from the store.

    `keys` are the chunks' store keys where known (their ids are then not tokenized again)."""
    ids, offsets = tokenize_prompt(engine, prompt, add_special_tokens)
    if ids.numel() == 0:
        raise ValueError("the prompt is empty: there is nothing to answer")
    token_at = {}
    for i, (s, e) in enumerate(offsets):
        if e > s:
            token_at.setdefault(s, i)
    spans: list[_Span] = []
    char_cursor, token_cursor = 0, 0
    for text, key in zip(chunks, keys or [None] * len(chunks), strict=True):
        span = _locate(engine, prompt, text, key, ids, token_at, char_cursor, token_cursor)
        if span is None:
            continue
        spans.append(span)
        token_cursor = span.start + span.ids.numel()
        char_cursor = offsets[token_cursor - 1][1]
    return Plan(_layout(engine, prompt, ids, offsets, spans, query), len(chunks), len(spans))


def _locate(
    engine: EpicEngine,
    prompt: str,
    text: str,
    key: str | None,
    ids: torch.Tensor,
    token_at: dict[int, int],
    char_cursor: int,
    token_cursor: int,
) -> _Span | None:
    """Where `text` (whole, else its leading part) sits in the prompt, as linkable tokens."""
    start = prompt.find(text, char_cursor)
    if start < 0:
        start = prompt.find(text[:ANCHOR_CHARS], char_cursor)
        if start < 0 or _common_chars(prompt, start, text) < max(ANCHOR_CHARS, MIN_PARTIAL_SHARE * len(text)):
            return None
    first = token_at.get(start)
    if first is None or first < token_cursor:
        return None
    entry_ids, key = engine.known_chunk(text, key)
    room = ids.numel() - 1 - first  # the last prompt token always stays computed
    n = min(entry_ids.numel(), room)
    same = (entry_ids[:n] == ids[first : first + n]).long()
    length = int(same.cumprod(0).sum()) if n > 0 else 0
    if length < min(MIN_LINK_TOKENS, entry_ids.numel()):
        return None
    return _Span(first, entry_ids[:length], key, entry_ids)


def _common_chars(prompt: str, start: int, text: str) -> int:
    n = 0
    for a, b in zip(prompt[start:], text, strict=False):
        if a != b:
            break
        n += 1
    return n


def _layout(
    engine: EpicEngine,
    prompt: str,
    ids: torch.Tensor,
    offsets: list[tuple[int, int]],
    spans: list[_Span],
    query: str | None,
) -> PromptLayout:
    if not spans:
        return PromptLayout.from_parts([(Kind.QUESTION, ids, None)])
    head = ids[: spans[0].start]
    head_text = prompt[: offsets[spans[0].start][0]]
    one_off = bool(query) and query in head_text
    parts = [(Kind.TEXT, head, None) if one_off else (Kind.PREFIX, head, engine.key_of(head) if head.numel() else None)]
    for i, span in enumerate(spans):
        parts.append((Kind.CHUNK, span.ids, span.key, span.entry_ids))
        end = span.start + span.ids.numel()
        nxt = spans[i + 1].start if i + 1 < len(spans) else ids.numel()
        kind = Kind.TEXT if i + 1 < len(spans) else Kind.QUESTION
        parts.append((kind, ids[end:nxt], None))
    return PromptLayout.from_parts(parts)
