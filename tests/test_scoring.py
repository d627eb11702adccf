"""LongBench-style answer scoring on hand-made cases."""

import pytest
from epic_rag_bench.scoring import best_over_golds, normalize_answer, rouge_l, token_f1


def test_normalisation_drops_case_punctuation_articles_and_extra_space():
    assert normalize_answer("  The  Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # only whole-word articles go


def test_exact_match_after_normalisation_scores_one():
    assert token_f1("The Cahiers du Cinéma.", "cahiers du cinéma") == 1.0


def test_partial_overlap_is_the_harmonic_mean_of_precision_and_recall():
    # prediction: 4 tokens, gold: 2 tokens, 2 shared -> P = 1/2, R = 1, F1 = 2/3
    assert token_f1("born in Ozalj Croatia", "Ozalj Croatia") == pytest.approx(2 / 3)
    # repeated tokens count only as often as they appear in both
    assert token_f1("paris paris", "paris") == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_no_overlap_and_empty_answers_score_zero():
    assert token_f1("London", "Ozalj") == 0.0
    assert token_f1("", "Ozalj") == 0.0
    assert token_f1("the", "a") == 0.0  # nothing left after normalisation


def test_best_over_multiple_golds():
    golds = ["16 September 1360", "1360"]
    assert best_over_golds(token_f1, "1360", golds) == 1.0
    assert best_over_golds(token_f1, "September 1360", golds) == pytest.approx(0.8)
    assert best_over_golds(token_f1, "anything", []) == 0.0


def test_rouge_l_uses_the_longest_common_subsequence():
    assert rouge_l("x y z w", "x z w v") == pytest.approx(0.75)  # LCS 3, P = R = 3/4
    assert rouge_l("w z y x", "x y z w") == pytest.approx(0.25)  # order matters, unlike F1
    assert token_f1("w z y x", "x y z w") == 1.0
