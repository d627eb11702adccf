"""EpicLLM: a LlamaIndex LLM whose prefill links the retrieved chunks' cached KV.

Each call finds the chunks the postprocessor handed over (see `handoff`) inside the
prompt (see `matching`), links their stored KV, and recomputes what the policy
selects (the engine's default policy unless told otherwise). Without a handoff it is plain generation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM

from epic_rag import DEFAULT_POLICY, EpicEngine, Generation, KVStore, RecomputePolicy, parse_policy
from epic_rag.forward import Cancelled

from .handoff import CallReport, Handoff, current_handoff
from .matching import plan_layout

_last_call: ContextVar[CallReport | None] = ContextVar("epic_rag_last_call", default=None)


def last_call() -> CallReport | None:
    """The report of this thread's (or task's) latest EpicLLM call."""
    return _last_call.get()


class EpicLLM(CustomLLM):
    """LlamaIndex LLM over an `EpicEngine`: cached chunk KV, selective recompute."""

    model_name: str = Field(default="epic-rag", description="the engine's model")
    policy: str = Field(default=DEFAULT_POLICY, description="recompute policy, e.g. attnlink:16, guided:16, full")
    max_new_tokens: int = Field(default=256, gt=0)
    min_new_tokens: int = Field(default=0, ge=0, description="no end token before this many (stop strings still end)")
    temperature: float = Field(default=0.0, ge=0.0, description="0 is greedy")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None)
    stop: list[str] = Field(default_factory=list, description="stop strings: the answer ends before the first")
    persist_prompt_head: bool = Field(
        default=True, description="store a computed prompt head on disk and Redis too (False: memory only)"
    )
    context_window: int | None = Field(default=None, description="defaults to the model's")

    _engine: EpicEngine = PrivateAttr()
    _policy: RecomputePolicy = PrivateAttr()
    _cancel: threading.Event | None = PrivateAttr(default=None)

    def __init__(self, engine: EpicEngine, cancel: threading.Event | None = None, **kwargs: Any) -> None:
        """`policy` may be a policy string or a RecomputePolicy (default: the engine's default
        policy); it is parsed here, once. Setting `cancel` stops a generation at its next token
        (a server does it when the client goes away), wherever the stream is consumed."""
        kwargs.setdefault("model_name", getattr(engine.model.config, "_name_or_path", None) or "epic-rag")
        policy = parse_policy(kwargs.pop("policy", None) or engine.default_policy)
        super().__init__(policy=policy.spec, **kwargs)
        self._policy = policy
        self._engine = engine
        self._cancel = cancel

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        store_dir: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        **kwargs: Any,
    ) -> EpicLLM:
        """Load the model (built-in offline name, folder, .gguf or hub id) with a KV store folder, on
        `device` in `dtype` (defaults: the best device present; bfloat16 on CUDA, float32 elsewhere)."""
        engine = EpicEngine.from_pretrained(model, store=KVStore(store_dir), device=device, dtype=dtype)
        return cls(engine, model_name=model, **kwargs)

    @classmethod
    def class_name(cls) -> str:
        return "EpicLLM"

    @property
    def engine(self) -> EpicEngine:
        return self._engine

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window or self._engine.max_context,
            num_output=self.max_new_tokens,
            is_chat_model=self._engine.use_chat_template,
            model_name=self.model_name,
        )

    # ---- prompt rendering -------------------------------------------------------------------
    def _render_messages(self, messages: Sequence[ChatMessage]) -> tuple[str, bool]:
        """(prompt text, whether the tokenizer should add special tokens)."""
        if not self._engine.use_chat_template:
            return self.messages_to_prompt(messages), True
        rendered = self._engine.tokenizer.apply_chat_template(
            [{"role": m.role.value, "content": m.content or ""} for m in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
        return rendered, False

    def _render_completion(self, prompt: str, formatted: bool) -> tuple[str, bool]:
        if formatted or not self._engine.use_chat_template:
            return prompt, True
        system = [ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt)] if self.system_prompt else []
        return self._render_messages(system + [ChatMessage(role=MessageRole.USER, content=prompt)])

    # ---- generation -------------------------------------------------------------------------
    def _deltas(
        self, prompt: str, add_special_tokens: bool, box: list[Generation], handoff: Handoff | None, **kwargs: Any
    ) -> Iterator[str]:
        """Text deltas of one generation; the Generation lands in `box`, the report in the handoff.

        The handoff is read by the caller when the call is made: a stream may be consumed in
        another thread (LlamaIndex's chat engines do), whose context holds no handoff."""
        engine = self._engine
        sampling = {
            "max_new_tokens": kwargs.get("max_new_tokens", self.max_new_tokens),
            "min_new_tokens": kwargs.get("min_new_tokens", self.min_new_tokens),
            "temperature": kwargs.get("temperature", self.temperature),
            "top_p": kwargs.get("top_p", self.top_p),
            "seed": kwargs.get("seed", self.seed),
            "stop": kwargs.get("stop") or tuple(self.stop),
        }
        chunks, keys, query = (handoff.chunks, handoff.keys, handoff.query) if handoff else ([], [], None)
        plan = plan_layout(engine, prompt, chunks, add_special_tokens, query, keys)
        policy = parse_policy(kwargs["policy"]) if "policy" in kwargs else self._policy
        persist = self.persist_prompt_head
        stream = engine.stream_layout(plan.layout, policy, self._cancel, persist, **sampling)  # locks each step only
        cancelled = False
        try:
            for delta in stream:
                if self._cancel is not None and self._cancel.is_set():
                    cancelled = True
                    stream.close()
                    break
                yield delta
        except Cancelled:  # the prefill stopped between layers: its client went away
            cancelled = True
        result = stream.result if not cancelled else None
        if result is None:
            return  # stopped by its caller: the stream never finished, nothing to report
        s = result.stats
        report = CallReport(
            chunks_handed=plan.chunks_handed,
            chunks_matched=plan.chunks_matched,
            tokens_total=s.tokens_total,
            tokens_reused=s.tokens_reused,
            tokens_recomputed=s.tokens_recomputed,
            store_hits=s.store_hits,
            store_misses=s.store_misses,
            ttft_s=s.ttft_s,
            policy=s.policy,
            tokens_generated=len(result.token_ids),
            finish_reason=result.finish_reason,
            decode_s=result.decode_s,
            chunk_hits=s.chunk_hits,
            chunk_misses=s.chunk_misses,
            prefix=s.prefix,
        )
        if handoff is not None:
            handoff.calls.append(report)
        _last_call.set(report)
        box.append(result)

    def _complete_text(self, prompt: str, add_special_tokens: bool, **kwargs: Any) -> CompletionResponse:
        box: list[Generation] = []
        text = "".join(self._deltas(prompt, add_special_tokens, box, current_handoff(), **kwargs))
        return CompletionResponse(text=text, raw=_raw(box))

    def _stream_text(self, prompt: str, add_special_tokens: bool, **kwargs: Any) -> CompletionResponseGen:
        box: list[Generation] = []
        deltas = self._deltas(prompt, add_special_tokens, box, current_handoff(), **kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for delta in deltas:
                text += delta
                yield CompletionResponse(text=text, delta=delta)
            yield CompletionResponse(text=text, delta="", raw=_raw(box))

        return gen()

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._complete_text(*self._render_completion(prompt, formatted), **kwargs)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._stream_text(*self._render_completion(prompt, formatted), **kwargs)

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        out = self._complete_text(*self._render_messages(messages), **kwargs)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=out.text), raw=out.raw)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            for out in self._stream_text(*self._render_messages(messages), **kwargs):
                message = ChatMessage(role=MessageRole.ASSISTANT, content=out.text)
                yield ChatResponse(message=message, delta=out.delta, raw=out.raw)

        return gen()

    # ---- async: run in a worker thread so the event loop stays free ----------------------------
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self._complete_text, *self._render_completion(prompt, formatted), **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        return _in_thread(self._stream_text(*self._render_completion(prompt, formatted), **kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _in_thread(self.stream_chat(messages, **kwargs))


async def _in_thread(items: Iterator[Any]) -> AsyncIterator[Any]:
    """Iterate a blocking generator one step at a time in worker threads."""
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        yield item


def _raw(box: list[Generation]) -> dict[str, Any]:
    """The finished generation's stats; a cancelled one has none."""
    if not box:
        return {"finish_reason": "cancelled"}
    result = box[0]
    s = result.stats
    return {
        "finish_reason": result.finish_reason,
        "ttft_s": s.ttft_s,
        "tokens_total": s.tokens_total,
        "tokens_reused": s.tokens_reused,
        "tokens_recomputed": s.tokens_recomputed,
        "store_hits": s.store_hits,
        "store_misses": s.store_misses,
        "policy": s.policy,
    }
