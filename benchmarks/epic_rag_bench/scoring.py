"""Answer scoring as LongBench does it: normalised token F1 and Rouge-L, best over golds.

Normalisation (SQuAD/LongBench): lower-case, drop punctuation, drop the articles
a/an/the, collapse whitespace. Both scores are fractions in 0..1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and articles, single spaces."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised answers are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def contains_answer(prediction: str, gold: str) -> float:
    """1.0 when the normalised gold answer appears, on word boundaries, in the normalised prediction."""
    pred, ref = normalize_answer(prediction), normalize_answer(gold)
    return float(bool(ref) and f" {ref} " in f" {pred} ")


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one row of the DP table at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, gold: str) -> float:
    """Rouge-L F-measure over normalised tokens."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction: str, golds: Sequence[str]) -> float:
    """The best score of `prediction` against any gold answer (0 when there are none)."""
    return max((metric(prediction, g) for g in golds), default=0.0)
