"""Ranking (`rank_bricks`) and what a brick adds to the index (`index_brick_texts`), on
hand-made unit vectors whose expected scores follow from the formula in the module docstring."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from registry.search.lexical import HASH_DIM, SparseVector
from registry.search.ranking import (
    RANKING,
    BrickFeatures,
    CorpusStats,
    index_brick_texts,
    rank_bricks,
    score_branches,
)

DIM = 4
EMPTY = SparseVector(np.zeros(0, np.int32), np.zeros(0, np.float32))


def bucket(feature: str) -> int:
    return zlib.crc32(feature.encode("utf-8")) % HASH_DIM


def unit(*values: float) -> np.ndarray:
    v = np.array(values, np.float32)
    return v / np.linalg.norm(v)


def brick(brick_id: int, desc: np.ndarray, examples: list[np.ndarray]) -> BrickFeatures:
    ex = np.stack(examples) if examples else np.zeros((0, DIM), np.float32)
    return BrickFeatures(brick_id, desc, ex, EMPTY, EMPTY, EMPTY)


def test_no_candidates_no_ranking() -> None:
    assert rank_bricks(unit(1, 0, 0, 0), "q", [], -1.0, CorpusStats.empty(DIM)) == []


def test_a_query_closest_to_a_description_is_scored_by_the_description_branch() -> None:
    a = brick(1, unit(1, 0, 0, 0), [unit(0, 0, 1, 0)])
    b = brick(2, unit(0, 1, 0, 0), [unit(0, 0, 0, 1)])
    # Best example cosine among the hits is 0, best description cosine 1: the gate is ~1.
    ranked = rank_bricks(unit(1, 0, 0, 0), "zzz", [b, a], 0.0, CorpusStats.empty(DIM))
    assert [r.brick_id for r in ranked] == [1, 2]
    top = ranked[0]
    assert (top.matched, top.ordinal) == ("description", 0)
    assert top.similarity == pytest.approx(1.0)
    assert top.score == pytest.approx(RANKING.lam * 1.0, rel=1e-6)  # lam * (cos 1 + beta * word 0)
    assert ranked[1].similarity == pytest.approx(0.0, abs=1e-7)


def test_a_query_closest_to_an_example_is_scored_by_the_example_branch() -> None:
    a = brick(1, unit(1, 0, 0, 0), [unit(0, 1, 0, 0)])
    b = brick(2, unit(1, 1, 0, 0), [unit(0, 0, 1, 0), unit(0, 0, 0, 1)])
    query = unit(0, 0, 0, 1)  # b's second example
    ranked = rank_bricks(query, "zzz", [a, b], 1.0, CorpusStats.empty(DIM))
    assert [r.brick_id for r in ranked] == [2, 1]
    top = ranked[0]
    assert (top.matched, top.ordinal) == ("example", 1)
    assert top.similarity == pytest.approx(1.0)
    # Gate ~0; the corpus mean is zero, so the example branch is a * cos(q, mean of b's examples).
    assert top.score == pytest.approx(RANKING.a / math.sqrt(2), rel=1e-5)


def test_a_brick_without_examples_matches_by_its_description() -> None:
    only_desc = brick(5, unit(0, 0, 1, 1), [])
    ranked = rank_bricks(unit(0, 0, 0, 1), "zzz", [only_desc], 1.0, CorpusStats.empty(DIM))
    assert (ranked[0].matched, ranked[0].ordinal) == ("description", 0)
    assert ranked[0].similarity == pytest.approx(1 / math.sqrt(2), rel=1e-6)


def test_equal_scores_are_ordered_by_brick_id() -> None:
    twins = [brick(i, unit(1, 0, 0, 0), [unit(0, 1, 0, 0)]) for i in (9, 3, 7)]
    ranked = rank_bricks(unit(1, 0, 0, 0), "zzz", twins, 0.0, CorpusStats.empty(DIM))
    assert [r.brick_id for r in ranked] == [3, 7, 9]
    assert len({r.score for r in ranked}) == 1


def test_shared_words_with_the_description_raise_the_score() -> None:
    description = "translate romanian emails"
    empty_stats = CorpusStats.empty(DIM)
    indexed, stats = index_brick_texts(
        description, ["buna ziua"], np.stack([unit(0, 1, 0, 0)]), np.stack([unit(1, 0, 0, 0)]), empty_stats
    )
    with_words = BrickFeatures(1, unit(1, 0, 0, 0), np.stack([unit(0, 1, 0, 0)]), EMPTY, EMPTY, indexed.word)
    plain = rank_bricks(unit(1, 0, 0, 0), "zzz", [with_words], 0.0, stats)[0].score
    wordy = rank_bricks(unit(1, 0, 0, 0), "translate romanian", [with_words], 0.0, stats)[0].score
    assert plain == pytest.approx(RANKING.lam, rel=1e-6)
    assert wordy > plain + RANKING.lam * RANKING.beta * 0.5  # word cosine is well above 0.5 here


def test_index_brick_texts_counts_the_brick_into_the_statistics() -> None:
    examples = ["parse invoices", "parse receipts"]
    ex_vecs = np.stack([unit(1, 0, 0, 0), unit(0, 1, 0, 0)])
    ex_layers = np.stack([unit(0, 0, 1, 0), unit(0, 0, 0, 1)])
    indexed, after = index_brick_texts("romanian translation", examples, ex_vecs, ex_layers, CorpusStats.empty(DIM))
    assert after.example_count == 2
    assert after.n_docs == 3  # the description and both examples
    assert after.example_sum.tolist() == pytest.approx([1, 1, 0, 0])
    assert after.mu.tolist() == pytest.approx([0.5, 0.5, 0, 0])
    assert after.layer_sum.tolist() == pytest.approx([0, 0, 1, 1])
    assert indexed.layer_mean.tolist() == pytest.approx([0, 0, 0.5, 0.5])
    for vector in (indexed.shape, indexed.prefix, indexed.word):
        assert float(np.linalg.norm(vector.val)) == pytest.approx(1.0, rel=1e-6)
    # Document frequencies count texts: "parse" is in two of them, every other word in one.
    word_df = after.df["word"]
    expected = {"parse": 2, "invoices": 1, "receipts": 1, "romanian": 1, "translation": 1}
    assert {bucket(w): int(word_df[bucket(w)]) for w in expected} == {bucket(w): n for w, n in expected.items()}
    assert int(word_df.sum()) == sum(expected.values())
    # The word view is the description's alone.
    assert sorted(indexed.word.idx.tolist()) == sorted([bucket("romanian"), bucket("translation")])


def test_removing_a_brick_restores_the_statistics_before_it() -> None:
    before = CorpusStats.empty(DIM)
    indexed, after = index_brick_texts("d", ["e"], np.stack([unit(1, 0, 0, 0)]), np.stack([unit(0, 1, 0, 0)]), before)
    restored = after.apply(indexed.delta, sign=-1)
    assert restored.example_count == 0 and restored.n_docs == 0
    assert restored.example_sum.tolist() == pytest.approx([0, 0, 0, 0])
    for view, df in restored.df.items():
        assert int(np.abs(df).sum()) == 0, view
        assert len(df) == HASH_DIM


def test_a_brick_without_examples_has_a_zero_layer_mean() -> None:
    indexed, after = index_brick_texts(
        "only a description", [], np.zeros((0, DIM), np.float32), np.zeros((0, DIM), np.float32), CorpusStats.empty(DIM)
    )
    assert indexed.layer_mean.tolist() == [0, 0, 0, 0]
    assert after.example_count == 0 and after.n_docs == 1
    assert len(indexed.shape.idx) == 0


def test_branch_scores_are_the_two_terms_of_the_formula() -> None:
    a = brick(1, unit(1, 0, 0, 0), [unit(0, 1, 0, 0)])
    b = brick(2, unit(0, 0, 1, 0), [unit(0, 1, 1, 0), unit(0, 0, 0, 1)])
    query = unit(1, 1, 0, 0)
    branches = score_branches(query, "zzz", [a, b], CorpusStats.empty(DIM))
    # No lexical overlap, empty corpus (mean zero): D = lam * cos(q, desc), E = a * cos(q, mean(examples)).
    assert branches.s_desc == pytest.approx([1 / math.sqrt(2), 0.0], abs=1e-6)
    assert branches.description == pytest.approx(RANKING.lam * branches.s_desc, rel=1e-6)
    mean_b = (unit(0, 1, 1, 0) + unit(0, 0, 0, 1)) / 2
    expected_b = float(query @ mean_b) / float(np.linalg.norm(mean_b))
    assert branches.example == pytest.approx([RANKING.a / math.sqrt(2), RANKING.a * expected_b], rel=1e-5)
