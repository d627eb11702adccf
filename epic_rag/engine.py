"""EpicEngine: compile chunks, link them at query time, recompute a few tokens, decode.

    engine = EpicEngine.from_pretrained("smollm2-135m-instruct", store_dir="kv")
    ids = engine.add_chunks(texts)                      # index time: KV of each chunk alone
    out = engine.generate("Who ...?", [ids[3], ids[0]])  # query time: any order, any position
    out.text, out.ttft_s, out.stats

Query time runs in three steps, each timed: load the cached KV of every segment the
policy does not fully recompute (store), link it into one positional buffer with keys
re-rotated to their global positions, and run only the positions the policy chooses
through the layers (`forward`), their fresh K/V overwriting the linked ones.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import PositionalKVCache
from .decode import Decoding
from .forward import LayerHook, run_layers
from .kv import ChunkKV, rotate_keys
from .layout import COMPUTED, PromptLayout, Segment
from .model import check_supported, fingerprint, load_model, rotary_facts
from .offline import DEFAULT_MODEL, builtin_policy
from .policies import Probe, RecomputePolicy, parse_policy
from .policy_spec import DEFAULT_POLICY
from .prompt import PromptBuilder
from .results import Generation, PrefillResult, PrefillStats, TokenStream
from .sampling import SamplingParams
from .store import KVStore, TieredStore

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
    ) -> None:
        """`default_policy` answers calls that name none (`from_pretrained` sets the one measured
        best for a built-in model); a prefill computing `progress_tokens` tokens or more shows a
        progress bar over the layers (None: never)."""
        check_supported(model.config)
        self.default_policy = parse_policy(default_policy)
        self.progress_tokens = progress_tokens
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rotary = rotary_facts(model)
        self.fingerprint = fingerprint(model)
        self.store = store if store is not None else KVStore()
        self.store.bind(self.fingerprint)
        self.prompt = PromptBuilder(tokenizer, self.fingerprint, chunk_separator, use_chat_template)
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_context = int(cfg.max_position_embeddings)
        self.stop_token_ids = self.prompt.stop_token_ids(getattr(model, "generation_config", None))

    @classmethod
    def from_pretrained(
        cls,
        spec: str | Path = DEFAULT_MODEL,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        trust_remote_code: bool = False,
        store_dir: str | Path | None = None,
        store_dtype: str | torch.dtype | None = None,
        memory_budget: int = 2 << 30,
        kv_url: str | None = None,
        kv_ttl_s: int | None = None,
        require_kv_url: bool = False,
        **engine_kwargs,
    ) -> EpicEngine:
        """Load a built-in offline model name, a .gguf file, a folder or a hub id.

        The store is memory over `store_dir` (if given) over the Redis server at `kv_url`
        (if given; see `KVStore` for `kv_ttl_s` and `require_kv_url`)."""
        store = KVStore(
            store_dir,
            memory_budget=memory_budget,
            dtype=store_dtype,
            kv_url=kv_url,
            kv_ttl_s=kv_ttl_s,
            require_kv_url=require_kv_url,
        )  # before the model: a bad KV URL fails in milliseconds, not after a load
        model, tokenizer = load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        engine_kwargs.setdefault("default_policy", builtin_policy(str(spec)) or DEFAULT_POLICY)
        return cls(model, tokenizer, store, **engine_kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def chunk_separator(self) -> str:
        return self.prompt.chunk_separator

    @property
    def use_chat_template(self) -> bool:
        return self.prompt.use_chat_template

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token takes in the model dtype, all layers."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * self.model.dtype.itemsize

    def tokenize(self, text: str) -> torch.Tensor:
        return self.prompt.tokenize(text)

    def chunk_token_ids(self, text: str) -> torch.Tensor:
        return self.prompt.chunk_token_ids(text)

    def key_of(self, token_ids: torch.Tensor, context_ids: torch.Tensor | None = None) -> str:
        return self.prompt.key_of(token_ids, context_ids)

    # ---- compile (index time) ----------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, token_ids: torch.Tensor, context_ids: torch.Tensor | None = None) -> ChunkKV:
        """Prefill `token_ids` from position 0 and return its per-layer K/V.

        With `context_ids` (neighbour-context compile) the tokens run after those, attending to
        them, and their keys are rotated back to base position 0: the entry links like any other."""
        n = token_ids.numel()
        if n == 0:
            raise ValueError("cannot encode an empty token sequence")
        m = 0 if context_ids is None else context_ids.numel()
        self._check_length(m + n, 0)
        cache = self._new_cache(m + n)
        if m:
            run_layers(self.model, cache, context_ids, torch.arange(m), m, logits=None)
        run_layers(self.model, cache, token_ids, torch.arange(m, m + n), m + n, logits=None)
        entry = cache.export(token_ids, start=m)
        if m:
            entry.keys = rotate_keys(entry.keys, self.rotary.inv_freq, -m)
            entry.context_ids = context_ids.clone()
        return entry

    def fetch(
        self, token_ids: torch.Tensor, key: str | None = None, context_ids: torch.Tensor | None = None
    ) -> tuple[ChunkKV, bool]:
        """(entry, was_hit): from the store, or computed (after `context_ids`), stored and
        returned as stored."""
        entry = self.store.get(key or self.key_of(token_ids, context_ids))
        if entry is not None:
            return entry, True
        entry = self.store.stored_form(self.encode(token_ids, context_ids))
        self.store.put(entry)
        return entry, False  # as later hits will see it: the first answer is not more exact than the next

    def add_chunks(
        self, texts: Sequence[str], progress: bool | None = None, after: Sequence[str | None] | None = None
    ) -> list[str]:
        """Precompute and store the KV of each chunk text; returns their chunk ids ('kv:<hash>').

        `after[i]`, when given and not None, is the text chunk i is compiled after (its
        predecessor in its document: neighbour-context compile); its entry is a separate one."""
        if after is not None and len(after) != len(texts):
            raise ValueError(f"after= names {len(after)} predecessors for {len(texts)} chunks; give one per chunk")
        ids = [self.chunk_token_ids(t) for t in texts]
        tokenized = dict(zip(texts, ids, strict=True))  # a predecessor is usually one of `texts`
        contexts = [
            None if a is None else tokenized[a] if a in tokenized else self.chunk_token_ids(a)
            for a in after or [None] * len(ids)
        ]
        out = []
        show = len(ids) > 1 if progress is None else progress
        pairs = zip(ids, contexts, strict=True)
        for token_ids, context_ids in tqdm(pairs, total=len(ids), desc="compiling chunk KV", disable=not show):
            key = self.key_of(token_ids, context_ids)
            self.fetch(token_ids, key, context_ids)
            self.prompt.remember(key, token_ids, context_ids)
            out.append(f"kv:{key}")
        return out

    def known_chunk(self, text: str, key: str | None = None) -> tuple[torch.Tensor, str]:
        """(ids, store key) of a chunk text, honouring `key` when it names a stored entry of these
        tokens (one compiled after its neighbour); see `PromptBuilder.known_chunk`."""
        return self.prompt.known_chunk(text, key, self._stored_entry)

    def _stored_entry(self, key: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        entry = self.store.get(key)
        return (entry.token_ids, entry.context_ids) if entry is not None else None

    def _stored_ids(self, key: str) -> torch.Tensor | None:
        entry = self.store.get(key)
        return entry.token_ids if entry is not None else None

    # ---- prompt layout -----------------------------------------------------------------------
    def layout(self, question: str, chunks: Sequence[str], system: str | None = None) -> PromptLayout:
        """[system + template head][chunks...][question + template tail], each tokenized alone."""
        return self.prompt.layout(question, chunks, system, self._stored_ids)

    def layout_from_text(
        self, prefix_text: str, chunks: Sequence[str], suffix_text: str, add_bos: bool = False
    ) -> PromptLayout:
        """Layout of an already formatted prompt: prefix text, chunks (text or ids), suffix text."""
        return self.prompt.layout_from_text(prefix_text, chunks, suffix_text, self._stored_ids, add_bos)

    def _check_length(self, n_prompt: int, n_new: int) -> None:
        if n_prompt + n_new > self.max_context:
            raise ValueError(
                f"prompt of {n_prompt} tokens plus {n_new} new tokens exceeds the model's context of "
                f"{self.max_context} tokens; retrieve fewer or shorter chunks, or lower max_new_tokens"
            )

    # ---- query time --------------------------------------------------------------------------
    def _new_cache(self, capacity: int) -> PositionalKVCache:
        return PositionalKVCache(self.n_layers, self.kv_heads, self.head_dim, capacity, self.model.dtype, self.device)

    def _load(self, layout: PromptLayout, skip: torch.Tensor, stats: PrefillStats) -> list[tuple[Segment, ChunkKV]]:
        """The stored KV of every cached segment not in `skip` ([N] bool), counted and timed."""
        start, linked = time.perf_counter(), []
        for seg in layout.segments:
            if seg.kind in COMPUTED or skip[seg.start : seg.end].all():
                continue
            t0 = time.perf_counter()
            ids = seg.source_ids if seg.source_ids is not None else seg.token_ids
            entry, hit = self.fetch(ids, seg.key, self.prompt.context_of(seg.key))
            linked.append((seg, entry.covering(seg.token_ids, seg.key)))
            stats.store_hits += hit
            stats.store_misses += not hit
            stats.compile_s += 0.0 if hit else time.perf_counter() - t0
        stats.kv_load_s = time.perf_counter() - start - stats.compile_s
        return linked

    def _run(self, cache: PositionalKVCache, layout: PromptLayout, positions: torch.Tensor, length: int, **kw):
        return run_layers(self.model, cache, layout.ids[positions], positions, length, **kw)

    @torch.inference_mode()
    def prefill(self, layout: PromptLayout, policy: Policy | None = None, extra_capacity: int = 0) -> PrefillResult:
        """Link the cached segments and recompute what `policy` selects; next-token logits."""
        policy = parse_policy(policy or self.default_policy)
        self._check_length(layout.length, extra_capacity)
        stats = PrefillStats(policy=policy.spec, tokens_total=layout.length, chunks=len(layout.chunks))
        start = time.perf_counter()
        positions = policy.select(layout)
        hook = policy.layer_hook(layout)
        skip = torch.zeros(layout.length, dtype=torch.bool)
        if hook is None:  # a hook may narrow to any position: then every segment is linked
            skip[positions] = True
        linked = self._load(layout, skip, stats)

        t0 = time.perf_counter()
        cache = self._new_cache(layout.length + extra_capacity)
        cache.rescale = policy.rescale
        for seg, entry in linked:
            cache.link(entry, seg.start, self.rotary.inv_freq)
        stats.link_s = time.perf_counter() - t0

        t0 = time.perf_counter()

        def probe_run(probed: torch.Tensor, probe_hook: LayerHook) -> None:
            stats.tokens_probed += probed.numel()
            self._run(cache, layout, probed, layout.length, hook=probe_hook, logits=None)

        positions = policy.refine(layout, positions, Probe(self.n_layers, probe_run))
        progress = self.progress_tokens is not None and positions.numel() >= self.progress_tokens
        out = self._run(cache, layout, positions, layout.length, hook=hook, progress=progress)
        stats.recompute_s = time.perf_counter() - t0
        stats.tokens_recomputed = out.positions.numel()
        stats.tokens_reused = layout.length - positions.numel()
        stats.ttft_s = time.perf_counter() - start
        return PrefillResult(cache, out.logits, stats, out.positions)

    @torch.inference_mode()
    def extend(
        self, prefilled: PrefillResult, token_ids: Sequence[int] | torch.Tensor, at: int | None = None
    ) -> torch.Tensor:
        """Run `token_ids` after a prefilled prompt and return the next-token logits at each of
        them: [n, vocab] float32 (decoding, teacher forcing, scoring).

        They go at position `at` (default: after everything written so far); pass the prompt
        length to branch again from the prompt, dropping an earlier continuation.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.int64).reshape(-1)
        positions = prefilled.cache.positions_after(ids.numel(), at)
        return run_layers(self.model, prefilled.cache, ids, positions, int(positions[-1]) + 1, logits="all").logits

    def prefill_logits(
        self, question: str, chunks: Sequence[str], system: str | None = None, policy: Policy = "full"
    ) -> torch.Tensor:
        """Next-token logits ([vocab], float32) after the prompt under `policy`."""
        return self.prefill(self.layout(question, chunks, system), policy).logits

    # ---- generation --------------------------------------------------------------------------
    def _deltas(self, layout: PromptLayout, policy: Policy, params: SamplingParams, box: list):
        """Text deltas of one answer; appends the finished Generation to `box`."""
        pre = self.prefill(layout, policy, extra_capacity=params.max_new_tokens)
        decoding = Decoding(
            pre.logits, lambda token: self.extend(pre, [token])[-1], self.tokenizer, self.stop_token_ids, params
        )
        yield from decoding
        pre.stats.first_decode_s = decoding.first_token_s
        pre.stats.ttft_s += decoding.first_token_s
        box.append(Generation(decoding.text, decoding.ids, decoding.finish_reason, pre.stats, decoding.decode_s))

    def stream_layout(self, layout: PromptLayout, policy: Policy | None = None, **sampling) -> TokenStream:
        box: list[Generation] = []
        return TokenStream(self._deltas(layout, policy, SamplingParams.from_kwargs(**sampling), box), box)

    def generate_layout(self, layout: PromptLayout, policy: Policy | None = None, **sampling) -> Generation:
        stream = self.stream_layout(layout, policy, **sampling)
        for _ in stream:
            pass
        return stream.result

    def stream(
        self,
        question: str,
        chunks: Sequence[str],
        system: str | None = None,
        policy: Policy | None = None,
        **sampling,
    ) -> TokenStream:
        """Like `generate`, but an iterator of text deltas; `.result` is the Generation at the end."""
        return self.stream_layout(self.layout(question, chunks, system), policy, **sampling)

    def generate(
        self,
        question: str,
        chunks: Sequence[str],
        system: str | None = None,
        policy: Policy | None = None,
        **sampling,
    ) -> Generation:
        """Answer `question` from `chunks` (texts or chunk ids, in this order).

        Sampling keywords: max_new_tokens=256, temperature=0.0 (greedy), top_p=1.0,
        seed=None, stop=() (strings that end the answer, not included in it).
        """
        return self.generate_layout(self.layout(question, chunks, system), policy, **sampling)
