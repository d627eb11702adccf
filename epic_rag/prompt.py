"""Tokens of a RAG prompt: tokenization, chunk ids and store keys, chat-template layout.

Every segment is tokenized on its own (system prefix, each chunk with the chunk
separator, question) and the ids are concatenated: tokenizing the joined text would
merge tokens across boundaries and a chunk would no longer match its cached KV.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

from .layout import PromptLayout
from .store import entry_key

CHUNK_ID = re.compile(r"^kv:([0-9a-f]{64})$")
_TEMPLATE_SLOT = "\x00EPIC_RAG_CONTENT\x00"
_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>")

# store key -> token ids of a chunk known only by its id ("kv:<key>"); None when unknown
IdsLookup = Callable[[str], "torch.Tensor | None"]
# store key -> (token ids, ids it was compiled after or None) of the stored entry; None when absent
EntryLookup = Callable[[str], "tuple[torch.Tensor, torch.Tensor | None] | None"]


class UnknownChunkError(KeyError):
    """A chunk id that is not in the KV store."""

    def __str__(self) -> str:
        return str(self.args[0])


class PromptBuilder:
    """Turns (system, chunks, question) into a PromptLayout for one tokenizer and model."""

    def __init__(
        self, tokenizer, fingerprint: str, chunk_separator: str = "\n\n", use_chat_template: bool | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.chunk_separator = chunk_separator
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        if self.use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        self._known_ids: dict[str, torch.Tensor] = {}  # store key -> chunk ids seen in this process
        self._contexts: dict[str, torch.Tensor] = {}  # store key -> ids its chunk was compiled after

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids of `text` alone, no special tokens added: [n] int64."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    def chunk_token_ids(self, text: str) -> torch.Tensor:
        """The ids a chunk is cached and linked with (its text plus the separator)."""
        if not text or not text.strip():
            raise ValueError("empty chunk text: drop empty documents or chunks before adding them")
        return self.tokenize(text + self.chunk_separator)

    def key_of(self, token_ids: torch.Tensor, context_ids: torch.Tensor | None = None) -> str:
        """The store key of a token sequence's KV under this model (compiled after `context_ids`)."""
        return entry_key(self.fingerprint, token_ids, context_ids)

    def remember(self, key: str, token_ids: torch.Tensor, context_ids: torch.Tensor | None = None) -> None:
        """Note the ids of a stored chunk (and what it was compiled after) so its id resolves
        without the store and a lost entry is compiled again the same way."""
        self._known_ids[key] = token_ids
        if context_ids is not None:
            self._contexts[key] = context_ids

    def context_of(self, key: str | None) -> torch.Tensor | None:
        """The ids the chunk stored under `key` was compiled after, when known (None: alone)."""
        return self._contexts.get(key) if key is not None else None

    def known_chunk(
        self, text: str, key: str | None = None, lookup: EntryLookup | None = None
    ) -> tuple[torch.Tensor, str]:
        """(ids, store key) of a chunk text: the ids noted under `key` when there are any; else
        the text tokenized once (and noted) under `key` when the store's entry for `key` holds
        these tokens (an entry compiled after its neighbour), or under its own key."""
        ids = self._known_ids.get(key) if key is not None else None
        if ids is not None:
            return ids, key
        ids = self.chunk_token_ids(text)
        plain = self.key_of(ids)
        if key is not None and key != plain and lookup is not None:
            stored = lookup(key)
            if stored is not None and torch.equal(stored[0], ids):
                self.remember(key, ids, stored[1])
                return ids, key
        self._known_ids[plain] = ids
        return ids, plain

    def chunk(self, chunk: str, lookup: IdsLookup) -> tuple[torch.Tensor, str]:
        """Chunk text or chunk id ('kv:<key>') -> (token ids, store key)."""
        match = CHUNK_ID.match(chunk)
        if match is None:
            return self.known_chunk(chunk)
        key = match.group(1)
        ids = self._known_ids.get(key)
        if ids is None:
            ids = lookup(key)
        if ids is None:
            raise UnknownChunkError(
                f"unknown chunk {chunk[:19]}...: it is not in the KV store of this model "
                "(another model, another store folder, or a damaged entry); pass its text or add it again "
                "with engine.add_chunks([text])"
            )
        self._known_ids[key] = ids
        return ids, key

    def stop_token_ids(self, generation_config) -> set[int]:
        """Ids that end an answer: the model's and tokenizer's EOS plus known end-of-turn tokens."""
        ids = set()
        for source in (generation_config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _STOP_TOKENS if t in vocab)
        return ids

    def layout(self, question: str, chunks: Sequence[str], system: str | None, lookup: IdsLookup) -> PromptLayout:
        """[system + template head][chunks...][question + template tail], each tokenized alone."""
        if not question or not question.strip():
            raise ValueError("the question is empty: there is nothing to answer")
        if self.use_chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": _TEMPLATE_SLOT}
            ]
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            head, tail = rendered.split(_TEMPLATE_SLOT)
            return self.layout_from_text(head, chunks, question + tail, lookup, add_bos=False)
        head = system + self.chunk_separator if system else ""
        return self.layout_from_text(head, chunks, question, lookup, add_bos=True)

    def layout_from_text(
        self, prefix_text: str, chunks: Sequence[str], suffix_text: str, lookup: IdsLookup, add_bos: bool = False
    ) -> PromptLayout:
        """Layout of an already formatted prompt: prefix text, chunks (text or ids), suffix text."""
        prefix = self.tokenize(prefix_text) if prefix_text else torch.empty(0, dtype=torch.int64)
        bos = self.tokenizer.bos_token_id
        if add_bos and bos is not None and getattr(self.tokenizer, "add_bos_token", True):
            prefix = torch.cat([torch.tensor([bos]), prefix])
        resolved = [self.chunk(c, lookup) for c in chunks]
        prefix_key = self.key_of(prefix) if prefix.numel() else None
        return PromptLayout.build(prefix, resolved, self.tokenize(suffix_text), prefix_key=prefix_key)
