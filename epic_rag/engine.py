"""EpicEngine: compile chunks, link them at query time, recompute a few tokens, decode.

    engine = EpicEngine.from_pretrained("smollm2-135m-instruct", store=KVStore("kv"))
    ids = engine.add_chunks(texts)                      # index time: KV of each chunk alone
    out = engine.generate("Who ...?", [ids[3], ids[0]])  # query time: any order, any position
    out.text, out.ttft_s, out.stats

Query time runs in three steps, each timed: load the cached KV of every segment the
policy does not fully recompute (store), link it into one positional buffer with keys
re-rotated to their global positions, and run only the positions the policy chooses
through the layers (`forward`), their fresh K/V overwriting the linked ones.

The engine owns one lock: compiling, prefilling and each decoded token hold it, and no
generator ever yields while holding it, so an abandoned stream never blocks the engine.
`start_batching` hands answering to a scheduler that decodes the answers of many threads
together (continuous batching, for a server); answers stay what they are alone.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .batch_decode import measure_step_ms
from .batch_limits import DEFAULT_MAX_BATCH, DEFAULT_PIECE_S
from .cache import PositionalKVCache
from .compile import chunk_contexts, encode_chunk
from .decode import lone_tokens, stream_answer
from .forward import cancellable, run_layers
from .kv import ChunkKV, CompileContext
from .layout import Kind, PromptLayout, Segment
from .model import FINGERPRINT_SCHEMES, check_supported, fingerprint, kv_geometry, load_model, rotary_facts
from .offline import DEFAULT_MODEL, builtin_policy
from .policies import RecomputePolicy, parse_policy
from .policy_spec import DEFAULT_POLICY
from .prefill import forward_timer, selective_prefill
from .prompt import PromptBuilder
from .rescale import install_rescaled_attention
from .results import Generation, PrefillResult, TokenStream
from .sampling import SamplingParams
from .scheduler import Scheduler
from .store import KVStore, TieredStore
from .store.registry import ChunkRegistry
from .timing import TimeModel

Policy = RecomputePolicy | str


class EpicEngine:
    """Position-independent context caching over one HF causal LM and one KV store."""

    def __init__(
        self,
        model,
        tokenizer,
        store: TieredStore | None = None,
        *,
        chunk_separator: str = "\n\n",
        use_chat_template: bool | None = None,
        default_policy: Policy = DEFAULT_POLICY,
        progress_tokens: int | None = None,
        fingerprint_scheme: str = FINGERPRINT_SCHEMES[0],
    ) -> None:
        """`default_policy` answers calls that name none (`from_pretrained`: the built-in model's
        measured best); prefills of `progress_tokens` tokens or more show a bar (None: never);
        `fingerprint_scheme` "float-sum" keys entries as indexes whose manifest names no scheme."""
        check_supported(model.config)
        self.default_policy = parse_policy(default_policy)
        self.progress_tokens = progress_tokens
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rotary = rotary_facts(model)
        self.fingerprint, self.fingerprint_scheme = fingerprint(model, fingerprint_scheme), fingerprint_scheme
        self.store = store if store is not None else KVStore()
        self.store.bind(self.fingerprint)
        self.prompt = PromptBuilder(tokenizer, self.fingerprint, chunk_separator, use_chat_template)
        self.chunk_separator, self.use_chat_template = self.prompt.chunk_separator, self.prompt.use_chat_template
        self.chunks = ChunkRegistry(self.store, self.prompt.chunk_token_ids, self.prompt.key_of)
        self.lock = threading.RLock()
        install_rescaled_attention(self.model)
        self.timing = TimeModel(measure=forward_timer(self.model, self._new_cache))  # what budget policies spend
        self.n_layers, self.kv_heads, self.head_dim = kv_geometry(model.config)
        self.max_context = int(model.config.max_position_embeddings)
        self.stop_token_ids = self.prompt.stop_token_ids(getattr(model, "generation_config", None))
        self.scheduler: Scheduler | None = None  # set while batching

    @classmethod
    def from_pretrained(
        cls,
        spec: str | Path = DEFAULT_MODEL,
        *,
        store: TieredStore | None = None,
        dtype: str | torch.dtype | None = None,
        device: str | None = None,
        trust_remote_code: bool = False,
        **engine_kwargs,
    ) -> EpicEngine:
        """Load a built-in offline model name, a .gguf file, a folder or a hub id, over `store`
        (default: a memory-only `KVStore`; e.g. `KVStore("kv", kv_url="redis://...")`), on `device`
        in `dtype` (defaults: the best device present; bfloat16 on CUDA, float32 elsewhere)."""
        model, tokenizer = load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        engine_kwargs.setdefault("default_policy", builtin_policy(str(spec)) or DEFAULT_POLICY)
        return cls(model, tokenizer, store, **engine_kwargs)

    @property
    def device(self) -> torch.device:  # where the model's weights are
        return self.model.device

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token takes in the model dtype, all layers."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * self.model.dtype.itemsize

    def tokenize(self, text: str) -> torch.Tensor:
        return self.prompt.tokenize(text)

    def chunk_token_ids(self, text: str) -> torch.Tensor:
        return self.prompt.chunk_token_ids(text)

    def key_of(self, token_ids: torch.Tensor, context: CompileContext | None = None) -> str:
        return self.prompt.key_of(token_ids, context)

    # ---- compile (index time) ----------------------------------------------------------------
    def encode(self, token_ids: torch.Tensor, context: CompileContext | None = None) -> ChunkKV:
        """The per-layer K/V of `token_ids` from position 0, alone or after `context`."""
        n = token_ids.numel() + (0 if context is None else context.ids.numel())
        self._check_length(n, 0)
        with self.lock:
            linked = [self.fetch(s)[0] for s in context.segments()] if context is not None and context.linked else []
            return encode_chunk(self.model, self._new_cache(n), token_ids, context, self.rotary.inv_freq, linked)

    def fetch(
        self,
        token_ids: torch.Tensor,
        key: str | None = None,
        context: CompileContext | None = None,
        persist: bool = True,
    ) -> tuple[ChunkKV, bool]:
        """(entry, was_hit): from the store, or computed (after `context`), stored (in memory only
        unless `persist`) and returned as stored (later hits see the same: the first answer is
        not more exact than the next)."""
        with self.lock:
            entry = self.store.get(key or self.key_of(token_ids, context))
            if entry is not None:
                return entry, True
            entry = self.store.stored_form(self.encode(token_ids, context))
            self.store.put(entry, persist=persist)
        return entry, False

    def add_chunks(
        self,
        texts: Sequence[str],
        progress: bool | None = None,
        after: Sequence[str | None] | None = None,
        link_after: Sequence[Sequence[str]] | None = None,
    ) -> list[str]:
        """Precompute and store the KV of each chunk text; returns their chunk ids ('kv:<hash>').

        Each chunk is compiled alone, or after `after[i]` (a text computed in full before it, e.g.
        its predecessor in its document), or after the prompt head and the texts `link_after[i]`
        linked from their own cached KV (nearest last: similar-chunk compile); a separate entry."""
        ids = [self.chunk_token_ids(t) for t in texts]
        known = dict(zip(texts, ids, strict=True))
        ids_of = lambda t: known[t] if t in known else self.chunk_token_ids(t)  # noqa: E731
        contexts = chunk_contexts(ids, ids_of, after, link_after, self.prompt.head_ids())
        out = []
        show = len(ids) > 1 if progress is None else progress
        pairs = zip(ids, contexts, strict=True)
        for token_ids, context in tqdm(pairs, total=len(ids), desc="compiling chunk KV", disable=not show):
            key = self.key_of(token_ids, context)
            self.fetch(token_ids, key, context)
            self.chunks.remember(key, token_ids, context)
            out.append(f"kv:{key}")
        return out

    def known_chunk(self, text: str, key: str | None = None) -> tuple[torch.Tensor, str]:
        """(ids, store key) of a chunk text, honouring `key` when it names a stored entry of these
        tokens (one compiled after its neighbour); see `ChunkRegistry.known_chunk`."""
        return self.chunks.known_chunk(text, key)

    # ---- prompt layout -----------------------------------------------------------------------
    def layout(self, question: str, chunks: Sequence[str], system: str | None = None) -> PromptLayout:
        """[system + template head][chunks...][question + template tail], each tokenized alone."""
        return self.prompt.layout(question, [self.chunks.resolve(c) for c in chunks], system)

    def _check_length(self, n_prompt: int, n_new: int) -> None:
        if n_prompt + n_new > self.max_context:
            raise ValueError(
                f"prompt of {n_prompt} tokens plus {n_new} new tokens exceeds the model's context of "
                f"{self.max_context} tokens; retrieve fewer or shorter chunks, or lower max_new_tokens"
            )

    # ---- query time --------------------------------------------------------------------------
    def _new_cache(self, capacity: int) -> PositionalKVCache:
        return PositionalKVCache(self.n_layers, self.kv_heads, self.head_dim, capacity, self.model.dtype, self.device)

    def _fetch_segment(self, seg: Segment, persist_head: bool = True) -> tuple[ChunkKV, bool]:
        ids = seg.source_ids if seg.source_ids is not None else seg.token_ids
        persist = persist_head or seg.kind != Kind.PREFIX
        entry, hit = self.fetch(ids, seg.key, self.chunks.context_of(seg.key), persist)
        return entry.covering(seg.token_ids, seg.key), hit

    def prefill(
        self, layout: PromptLayout, policy: Policy | None = None, extra_capacity: int = 0, persist_head: bool = True
    ) -> PrefillResult:
        """Link the cached segments and recompute what `policy` selects; next-token logits. Without
        `persist_head` a computed prompt head stays in memory (one holding a client's own text)."""
        policy = parse_policy(policy or self.default_policy)
        self._check_length(layout.length, extra_capacity)
        cache = self._new_cache(layout.length + extra_capacity)
        fetch = partial(self._fetch_segment, persist_head=persist_head)
        with self.lock:
            run = dict(progress_tokens=self.progress_tokens, timing=self.timing)
            return selective_prefill(self.model, layout, policy, cache, fetch, self.rotary.inv_freq, **run)

    @torch.inference_mode()
    def extend(
        self, prefilled: PrefillResult, token_ids: Sequence[int] | torch.Tensor, at: int | None = None
    ) -> torch.Tensor:
        """Run `token_ids` after a prefilled prompt; the next-token logits at each: [n, vocab] float32.

        They go at position `at` (default: after everything written so far); pass the prompt
        length to branch again from the prompt, dropping an earlier continuation."""
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        with self.lock:
            positions = prefilled.cache.positions_after(ids.numel(), at)
            return run_layers(self.model, prefilled.cache, ids, positions, int(positions[-1]) + 1, logits="all").logits

    def prefill_logits(
        self, question: str, chunks: Sequence[str], system: str | None = None, policy: Policy = "full"
    ) -> torch.Tensor:
        """Next-token logits ([vocab], float32) after the prompt under `policy`."""
        return self.prefill(self.layout(question, chunks, system), policy).logits

    # ---- generation --------------------------------------------------------------------------
    def stream_layout(
        self,
        layout: PromptLayout,
        policy: Policy | None = None,
        cancel: threading.Event | None = None,
        persist_head: bool = True,
        **sampling,
    ) -> TokenStream:
        """Text deltas of the answer after `layout`; the engine's lock is held only inside the prefill
        and each decoded token, never while the caller holds a delta. Setting `cancel` stops the
        prefill before its next layer (`Cancelled` from the first delta); see `prefill` for `persist_head`."""
        params = SamplingParams.from_kwargs(**sampling)
        prefill = partial(self.prefill, layout, policy, params.max_new_tokens, persist_head)
        if (scheduler := self.scheduler) is not None:
            kv_bytes = (layout.length + params.max_new_tokens) * self.kv_bytes_per_token
            answer = scheduler.answer(prefill, params, cancel, kv_bytes)
            return stream_answer(answer.prefilled, answer.tokens, self.tokenizer, self.stop_token_ids, params)

        def lone_prefill() -> PrefillResult:
            with cancellable(cancel):
                return prefill()

        tokens = lone_tokens(self.extend, params, self.stop_token_ids)
        return stream_answer(lone_prefill, tokens, self.tokenizer, self.stop_token_ids, params)

    def start_batching(self, max_batch: int = DEFAULT_MAX_BATCH, piece_s: float = DEFAULT_PIECE_S) -> Scheduler:
        """Decode the answers streamed from several threads together, up to `max_batch` per forward,
        a new prompt's prefill cut in pieces of about `piece_s` seconds between their steps (see
        `scheduler`); a step of each size is timed first (4 s on 2 cores for 8, Qwen), and each
        step runs as many answers as make the most tokens per second. Each answer is the one it
        would be alone; `stop_batching` ends it."""
        if self.scheduler is not None:
            raise RuntimeError("this engine is already batching; stop_batching() first")
        with self.lock:  # what a step of each size costs here decides how many step at once
            step_ms = measure_step_ms(self.model, self._new_cache, max_batch)
        self.scheduler = Scheduler(self.model, self.lock, self.stop_token_ids, max_batch, piece_s, step_ms)
        return self.scheduler

    def stop_batching(self) -> None:
        """Answer alone again, once the scheduler's current step is done (its answers get an error)."""
        scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None:
            scheduler.close()

    def generate_layout(self, layout: PromptLayout, policy: Policy | None = None, **sampling) -> Generation:
        return self.stream_layout(layout, policy, **sampling).finish()

    def stream(
        self, question: str, chunks: Sequence[str], system: str | None = None, policy: Policy | None = None, **sampling
    ) -> TokenStream:
        """Like `generate`, but an iterator of text deltas; `.result` is the Generation at the end."""
        return self.stream_layout(self.layout(question, chunks, system), policy, **sampling)

    def generate(
        self, question: str, chunks: Sequence[str], system: str | None = None, policy: Policy | None = None, **sampling
    ) -> Generation:
        """Answer `question` from `chunks` (texts or chunk ids, in this order). Sampling keywords:
        max_new_tokens=256, min_new_tokens=0 (no stop token before), temperature=0.0 (greedy), top_p=1.0,
        seed=None, stop=() (not in the answer)."""
        return self.generate_layout(self.layout(question, chunks, system), policy, **sampling)
