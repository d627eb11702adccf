"""Tokens of a RAG prompt: tokenization, store keys, chat-template layout.

Chunks arrive resolved to (token ids, store key) by the chunk registry. Every segment
is tokenized on its own (system prefix, each chunk with the chunk separator, question)
and the ids are concatenated: tokenizing the joined text would merge tokens across
boundaries and a chunk would no longer match its cached KV.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kv import CompileContext
from .layout import PromptLayout
from .store import entry_key

_TEMPLATE_SLOT = "\x00EPIC_RAG_CONTENT\x00"
_STOP_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>")

Resolved = tuple[torch.Tensor, str]  # a chunk's (token ids, store key)


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

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids of `text` alone, no special tokens added: [n] int64."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    def chunk_token_ids(self, text: str) -> torch.Tensor:
        """The ids a chunk is cached and linked with (its text plus the separator)."""
        if not text or not text.strip():
            raise ValueError("empty chunk text: drop empty documents or chunks before adding them")
        return self.tokenize(text + self.chunk_separator)

    def key_of(self, token_ids: torch.Tensor, context: CompileContext | None = None) -> str:
        """The store key of a token sequence's KV under this model (compiled after `context`)."""
        if context is None:
            return entry_key(self.fingerprint, token_ids)
        return entry_key(self.fingerprint, token_ids, context.ids, context.spans)

    def stop_token_ids(self, generation_config) -> set[int]:
        """Ids that end an answer: the model's and tokenizer's EOS plus known end-of-turn tokens."""
        ids = set()
        for source in (generation_config, self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in _STOP_TOKENS if t in vocab)
        return ids

    def layout(self, question: str, chunks: Sequence[Resolved], system: str | None) -> PromptLayout:
        """[system + template head][chunks...][question + template tail], each tokenized alone."""
        if not question or not question.strip():
            raise ValueError("the question is empty: there is nothing to answer")
        head, tail = self._around_chunks(system)
        return self.layout_from_text(head, chunks, question + tail, add_bos=not self.use_chat_template)

    def head_ids(self, system: str | None = None) -> torch.Tensor:
        """The ids every prompt with this system text starts with, before its chunks: [m]."""
        prefix = self.layout("?", [], system).prefix
        return prefix.token_ids if prefix is not None else torch.empty(0, dtype=torch.int64)

    def _around_chunks(self, system: str | None) -> tuple[str, str]:
        """(text before the chunks, text after the question) of the prompt format."""
        if not self.use_chat_template:
            return (system + self.chunk_separator if system else ""), ""
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": _TEMPLATE_SLOT}
        ]
        rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, tail = rendered.split(_TEMPLATE_SLOT)
        return head, tail

    def layout_from_text(
        self, prefix_text: str, chunks: Sequence[Resolved], suffix_text: str, add_bos: bool = False
    ) -> PromptLayout:
        """Layout of an already formatted prompt: prefix text, resolved chunks, suffix text."""
        prefix = self.tokenize(prefix_text) if prefix_text else torch.empty(0, dtype=torch.int64)
        bos = self.tokenizer.bos_token_id
        if add_bos and bos is not None and getattr(self.tokenizer, "add_bos_token", True):
            prefix = torch.cat([torch.tensor([bos]), prefix])
        prefix_key = self.key_of(prefix) if prefix.numel() else None
        return PromptLayout.build(prefix, list(chunks), self.tokenize(suffix_text), prefix_key=prefix_key)
