"""EpicEngine: compile chunks, link them at query time, recompute a few tokens, decode.

    engine = EpicEngine.from_pretrained("smollm2-135m-instruct", store_dir="kv")
    ids = engine.add_chunks(texts)                      # index time: KV of each chunk alone
    out = engine.generate("Who ...?", [ids[3], ids[0]])  # query time: any order, any position
    out.text, out.ttft_s, out.stats

Query time runs in three steps, each timed: load the cached KV of every segment
the policy does not fully recompute (store), link it into one positional buffer with
keys re-rotated to their global positions, and run only the selected positions
through the layers, their fresh K/V overwriting the linked ones at every layer.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .cache import PositionalKVCache
from .kv import ChunkKV
from .layout import COMPUTED, PromptLayout, Segment
from .model import check_supported, fingerprint, load_model, rotary_facts
from .offline import DEFAULT_MODEL
from .policies import AttnLink, FullRecompute, RecomputePolicy, parse_policy
from .sampling import SamplingParams, TextAssembler, choose_token
from .store import KVStore, entry_key

CHUNK_ID = re.compile(r"^kv:([0-9a-f]{64})$")
_TEMPLATE_SLOT = "\x00EPIC_RAG_CONTENT\x00"


class UnknownChunkError(KeyError):
    """A chunk id that is not in the KV store."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass
class PrefillStats:
    """What one query reused, recomputed, and where its time-to-first-token went."""

    policy: str
    tokens_total: int = 0
    tokens_reused: int = 0  # positions whose K/V came from the store, never recomputed
    tokens_recomputed: int = 0  # positions that ran through the last layer
    chunks: int = 0
    store_hits: int = 0
    store_misses: int = 0  # segments computed on the spot because the store lacked them
    kv_load_s: float = 0.0
    compile_s: float = 0.0  # time spent computing missing segments
    link_s: float = 0.0
    recompute_s: float = 0.0
    first_decode_s: float = 0.0  # choosing the first token from the logits
    ttft_s: float = 0.0

    @property
    def recomputed_fraction(self) -> float:
        return self.tokens_recomputed / self.tokens_total if self.tokens_total else 0.0


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop string), "eos" or "length"
    stats: PrefillStats
    decode_s: float = 0.0

    @property
    def ttft_s(self) -> float:
        return self.stats.ttft_s


@dataclass
class PrefillResult:
    """A prompt prefilled under one policy: the cache to decode from and the next-token logits."""

    cache: PositionalKVCache
    logits: torch.Tensor  # [vocab] next-token logits, float32
    stats: PrefillStats = field(repr=False)


class TokenStream:
    """Iterates over text deltas as they are generated; `.result` holds the Generation after."""

    def __init__(self, deltas: Iterator[str], box: list) -> None:
        self._deltas, self._box = deltas, box

    def __iter__(self) -> Iterator[str]:
        return self._deltas

    @property
    def result(self) -> Generation:
        if not self._box:
            raise RuntimeError("the stream has not finished; iterate over it first")
        return self._box[0]


class EpicEngine:
    """Position-independent context caching over one HF causal LM and one KV store."""

    def __init__(
        self,
        model,
        tokenizer,
        store: KVStore | None = None,
        *,
        chunk_separator: str = "\n\n",
        use_chat_template: bool | None = None,
    ) -> None:
        check_supported(model.config)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.rotary = rotary_facts(model)
        self.fingerprint = fingerprint(model)
        self.store = store if store is not None else KVStore()
        self.chunk_separator = chunk_separator
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        if self.use_chat_template and not has_template:
            raise ValueError("use_chat_template=True but the tokenizer has no chat template")
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_context = int(cfg.max_position_embeddings)
        self.stop_token_ids = self._stop_token_ids()
        self._known_ids: dict[str, torch.Tensor] = {}

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
        **engine_kwargs,
    ) -> EpicEngine:
        """Load a built-in offline model name, a .gguf file, a folder or a hub id."""
        model, tokenizer = load_model(spec, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        store = KVStore(store_dir, memory_budget=memory_budget, dtype=store_dtype)
        return cls(model, tokenizer, store, **engine_kwargs)

    # ---- tokens ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token takes in the model dtype, all layers."""
        return 2 * self.n_layers * self.kv_heads * self.head_dim * self.model.dtype.itemsize

    def tokenize(self, text: str) -> torch.Tensor:
        """Token ids of `text` alone, no special tokens added: [n] int64."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)

    def chunk_token_ids(self, text: str) -> torch.Tensor:
        """The ids a chunk is cached and linked with (its text plus the separator)."""
        if not text or not text.strip():
            raise ValueError("empty chunk text: drop empty documents or chunks before adding them")
        return self.tokenize(text + self.chunk_separator)

    def key_of(self, token_ids: torch.Tensor) -> str:
        return entry_key(self.fingerprint, token_ids)

    def _stop_token_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "<|end|>") if t in vocab)
        return ids

    # ---- compile (index time) ----------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, token_ids: torch.Tensor) -> ChunkKV:
        """Prefill `token_ids` alone from position 0 and return its per-layer K/V."""
        n = token_ids.numel()
        if n == 0:
            raise ValueError("cannot encode an empty token sequence")
        self._check_length(n, 0)
        cache = self._new_cache(n)
        self._forward(cache, token_ids, torch.arange(n), n, logits=False)
        return cache.export(token_ids)

    def _fetch(self, token_ids: torch.Tensor, key: str | None = None) -> tuple[ChunkKV, bool]:
        """(entry, was_hit): from the store, or computed and stored on a miss."""
        key = key or self.key_of(token_ids)
        entry = self.store.get(key, self.fingerprint)
        if entry is not None:
            return entry, True
        entry = self.store.stored_form(self.encode(token_ids))
        self.store.put(self.fingerprint, entry)
        return entry, False  # as later hits will see it: the first answer is not more exact than the next

    def add_chunks(self, texts: Sequence[str], progress: bool | None = None) -> list[str]:
        """Precompute and store the KV of each chunk text; returns their chunk ids ('kv:<hash>')."""
        ids = [self.chunk_token_ids(t) for t in texts]
        show = len(ids) > 1 if progress is None else progress
        out = []
        for token_ids in tqdm(ids, desc="compiling chunk KV", unit="chunk", disable=not show):
            key = self.key_of(token_ids)
            if not self.store.contains(key) or self.store.get(key, self.fingerprint) is None:
                self.store.put(self.fingerprint, self.encode(token_ids))
            self._known_ids[key] = token_ids
            out.append(f"kv:{key}")
        return out

    def _resolve_chunk(self, chunk: str) -> tuple[torch.Tensor, str]:
        """Chunk text or chunk id -> (token ids, store key)."""
        match = CHUNK_ID.match(chunk)
        if match is None:
            ids = self.chunk_token_ids(chunk)
            return ids, self.key_of(ids)
        key = match.group(1)
        if key in self._known_ids:
            return self._known_ids[key], key
        entry = self.store.get(key, self.fingerprint)
        if entry is None:
            raise UnknownChunkError(
                f"unknown chunk {chunk[:19]}...: it is not in the KV store of this model "
                "(another model, another store folder, or a damaged entry); pass its text or add it again "
                "with engine.add_chunks([text])"
            )
        self._known_ids[key] = entry.token_ids
        return entry.token_ids, key

    # ---- prompt layout -----------------------------------------------------------------------
    def layout(self, question: str, chunks: Sequence[str], system: str | None = None) -> PromptLayout:
        """[system + template head][chunks...][question + template tail], each tokenized alone."""
        if not question or not question.strip():
            raise ValueError("the question is empty: there is nothing to answer")
        if self.use_chat_template:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": _TEMPLATE_SLOT}
            ]
            rendered = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            head, tail = rendered.split(_TEMPLATE_SLOT)
            return self.layout_from_text(head, chunks, question + tail, add_bos=False)
        head = system + self.chunk_separator if system else ""
        return self.layout_from_text(head, chunks, question, add_bos=True)

    def layout_from_text(
        self, prefix_text: str, chunks: Sequence[str], suffix_text: str, add_bos: bool = False
    ) -> PromptLayout:
        """Layout of an already formatted prompt: prefix text, chunks (text or ids), suffix text."""
        prefix = self.tokenize(prefix_text) if prefix_text else torch.empty(0, dtype=torch.int64)
        bos = self.tokenizer.bos_token_id
        if add_bos and bos is not None and getattr(self.tokenizer, "add_bos_token", True):
            prefix = torch.cat([torch.tensor([bos]), prefix])
        resolved = [self._resolve_chunk(c) for c in chunks]
        prefix_key = self.key_of(prefix) if prefix.numel() else None
        return PromptLayout.build(prefix, resolved, self.tokenize(suffix_text), prefix_key=prefix_key)

    def _check_length(self, n_prompt: int, n_new: int) -> None:
        if n_prompt + n_new > self.max_context:
            raise ValueError(
                f"prompt of {n_prompt} tokens plus {n_new} new tokens exceeds the model's context of "
                f"{self.max_context} tokens; retrieve fewer or shorter chunks, or lower max_new_tokens"
            )

    # ---- query time --------------------------------------------------------------------------
    def _new_cache(self, capacity: int) -> PositionalKVCache:
        return PositionalKVCache(self.n_layers, self.kv_heads, self.head_dim, capacity, self.model.dtype, self.device)

    @torch.inference_mode()
    def prefill(self, layout: PromptLayout, policy: RecomputePolicy | str, extra_capacity: int = 0) -> PrefillResult:
        """Link the cached segments and recompute what `policy` selects; next-token logits."""
        policy = parse_policy(policy)
        self._check_length(layout.length, extra_capacity)
        stats = PrefillStats(policy=policy.spec, tokens_total=layout.length, chunks=len(layout.chunks))
        start = time.perf_counter()
        positions = policy.select(layout)
        selected = torch.zeros(layout.length, dtype=torch.bool)
        selected[positions] = True
        narrows = policy.check_layer is not None
        linked: list[tuple[Segment, ChunkKV]] = []
        for seg in layout.segments:
            if seg.kind in COMPUTED or (selected[seg.start : seg.end].all() and not narrows):
                continue
            t0 = time.perf_counter()
            entry, hit = self._fetch(seg.token_ids, seg.key)
            entry = _leading_part(entry, seg)
            if hit:
                stats.store_hits += 1
            else:
                stats.store_misses += 1
                stats.compile_s += time.perf_counter() - t0
            linked.append((seg, entry))
        stats.kv_load_s = time.perf_counter() - start - stats.compile_s

        t0 = time.perf_counter()
        cache = self._new_cache(layout.length + extra_capacity)
        for seg, entry in linked:
            cache.link(entry, seg.start, self.rotary.inv_freq)
        stats.link_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        logits, final = self._forward(
            cache, layout.ids[positions], positions, layout.length, policy=policy, layout=layout
        )
        stats.recompute_s = time.perf_counter() - t0
        stats.tokens_recomputed = final.numel()
        stats.tokens_reused = layout.length - int(selected.sum())
        stats.ttft_s = time.perf_counter() - start
        return PrefillResult(cache, logits, stats)

    def _attention_mask(self, positions: torch.Tensor, length: int) -> torch.Tensor | None:
        """Additive mask [1, 1, S, length]: a query sees keys at its own position or before."""
        n = positions.numel()
        at_end = int(positions[-1]) == length - 1 and int(positions[0]) == length - n
        if at_end and (n == 1 or (n == length and self.model.config._attn_implementation == "sdpa")):
            return None  # one new token, or the whole sequence under SDPA's own causal kernel
        allowed = torch.arange(length, device=self.device)[None, :] <= positions.to(self.device)[:, None]
        mask = torch.zeros(allowed.shape, dtype=self.model.dtype, device=self.device)
        return mask.masked_fill_(~allowed, torch.finfo(self.model.dtype).min)[None, None]

    def _forward(
        self,
        cache: PositionalKVCache,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        length: int,
        *,
        policy: RecomputePolicy | None = None,
        layout: PromptLayout | None = None,
        logits: bool = True,
        every_position: bool = False,
    ):
        """Run `token_ids` at `positions` through every layer against the first `length` cache slots.

        Returns (next-token logits, positions that reached the last layer), or None when
        `logits` is False. Logits are [vocab] float32 for the last position, or
        [S, vocab] for every position with `every_position`.
        """
        inner = self.model.model
        cache.begin(positions, length)
        hidden = inner.embed_tokens(token_ids.to(self.device)[None])  # [1, S, hidden]
        pos = positions.to(self.device)[None]  # [1, S]
        cos, sin = inner.rotary_emb(hidden, pos)  # each [1, S, head_dim]
        mask = self._attention_mask(positions, length)
        check_layer = policy.check_layer if policy is not None else None
        for i, layer in enumerate(inner.layers):
            if i == check_layer:
                cached_v = cache.values[i, 0][:, positions].clone()  # [kv_heads, S, head_dim]
            hidden = layer(hidden, attention_mask=mask, position_ids=pos, cache=cache, position_embeddings=(cos, sin))
            if i == check_layer:
                fresh_v = cache.values[i, 0][:, positions]
                deviation = (fresh_v.float() - cached_v.float()).pow(2).sum(dim=(0, 2))  # [S]
                keep = policy.narrow(layout, positions, deviation.cpu())
                positions = positions[keep]
                keep = keep.to(self.device)
                hidden, pos, cos, sin = hidden[:, keep], pos[:, keep], cos[:, keep], sin[:, keep]
                mask = self._attention_mask(positions, length)
                cache.begin(positions, length)
        if not logits:
            return None
        out = self.model.lm_head(inner.norm(hidden if every_position else hidden[:, -1:]))[0].float().cpu()
        return (out if every_position else out[-1]), positions

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
        start = prefilled.cache.length if at is None else at
        if not 0 < start <= prefilled.cache.length:
            raise ValueError(f"cannot extend at position {start}: {prefilled.cache.length} positions are written")
        if ids.numel() == 0:
            raise ValueError("nothing to extend with: token_ids is empty")
        if start + ids.numel() > prefilled.cache.capacity:
            raise ValueError(
                f"{ids.numel()} more tokens overflow the cache ({start} used of {prefilled.cache.capacity}); "
                "prefill with a larger extra_capacity"
            )
        positions = torch.arange(start, start + ids.numel())
        logits, _ = self._forward(prefilled.cache, ids, positions, start + ids.numel(), every_position=True)
        return logits

    def prefill_logits(
        self,
        question: str,
        chunks: Sequence[str],
        system: str | None = None,
        policy: RecomputePolicy | str = FullRecompute(),
    ) -> torch.Tensor:
        """Next-token logits ([vocab], float32) after the prompt under `policy`."""
        return self.prefill(self.layout(question, chunks, system), policy).logits

    # ---- generation --------------------------------------------------------------------------
    def _run(self, layout: PromptLayout, policy: RecomputePolicy | str, params: SamplingParams, box: list):
        """Generator of text deltas; appends the finished Generation to `box`."""
        pre = self.prefill(layout, policy, extra_capacity=params.max_new_tokens)
        generator = None
        if params.temperature > 0:
            generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
        text = TextAssembler(self.tokenizer, params.stop)
        t0 = time.perf_counter()
        token = choose_token(pre.logits, params, generator)
        pre.stats.first_decode_s = time.perf_counter() - t0
        pre.stats.ttft_s += pre.stats.first_decode_s
        decode_start, finish = time.perf_counter(), "length"
        for step in range(params.max_new_tokens):
            if token in self.stop_token_ids:
                finish = "eos"
                break
            delta = text.add(token)
            if delta:
                yield delta
            if text.stopped:
                finish = "stop"
                break
            if step == params.max_new_tokens - 1:
                break
            token = choose_token(self.extend(pre, [token])[-1], params, generator)
        tail = text.flush()
        if tail:
            yield tail
        box.append(Generation(text.text, text.ids, finish, pre.stats, time.perf_counter() - decode_start))

    def stream_layout(
        self, layout: PromptLayout, policy: RecomputePolicy | str = AttnLink(16), **sampling
    ) -> TokenStream:
        box: list[Generation] = []
        return TokenStream(self._run(layout, policy, SamplingParams(**_sampling(sampling)), box), box)

    def generate_layout(self, layout: PromptLayout, policy: RecomputePolicy | str = AttnLink(16), **sampling):
        stream = self.stream_layout(layout, policy, **sampling)
        for _ in stream:
            pass
        return stream.result

    def stream(
        self,
        question: str,
        chunks: Sequence[str],
        system: str | None = None,
        policy: RecomputePolicy | str = AttnLink(16),
        **sampling,
    ) -> TokenStream:
        """Like `generate`, but an iterator of text deltas; `.result` is the Generation at the end."""
        return self.stream_layout(self.layout(question, chunks, system), policy, **sampling)

    def generate(
        self,
        question: str,
        chunks: Sequence[str],
        system: str | None = None,
        policy: RecomputePolicy | str = AttnLink(16),
        **sampling,
    ) -> Generation:
        """Answer `question` from `chunks` (texts or chunk ids, in this order).

        Sampling keywords: max_new_tokens=256, temperature=0.0 (greedy), top_p=1.0,
        seed=None, stop=() (strings that end the answer, not included in it).
        """
        return self.generate_layout(self.layout(question, chunks, system), policy, **sampling)


def _leading_part(entry: ChunkKV, seg: Segment) -> ChunkKV:
    """The part of a stored entry that `seg` covers: all of it, or its leading tokens."""
    n = seg.token_ids.numel()
    if len(entry) < n or not torch.equal(entry.token_ids[:n], seg.token_ids):
        raise ValueError(f"the stored entry {seg.key} does not begin with the tokens of its {seg.kind.value} segment")
    return entry.head(n)


def _sampling(kwargs: dict) -> dict:
    stop = kwargs.get("stop")
    if isinstance(stop, str):
        kwargs = {**kwargs, "stop": (stop,)}
    elif stop is not None:
        kwargs = {**kwargs, "stop": tuple(stop)}
    return kwargs
