"""The lexical views of a text (shape, prefix, word) and their TF-IDF vectors, checked against
the definitions in `registry.search.lexical`'s docstring, computed here by hand."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest

from registry.search.lexical import HASH_DIM, SparseVector, brick_vector, shape_of, text_features, unit_tfidf


def bucket(feature: str) -> int:
    return zlib.crc32(feature.encode("utf-8")) % HASH_DIM


def test_shape_maps_character_classes_and_caps_runs_at_two() -> None:
    assert shape_of("Hello World 2024!") == "Aaa Aaa 99!"
    assert shape_of("née") == "aUa"
    assert shape_of("...") == ".."
    assert shape_of("") == ""


def test_word_view_lowercases_and_drops_stop_words() -> None:
    idx, tf = text_features("The cat and THE Cat", "word")
    assert idx.tolist() == [bucket("cat")]
    assert tf.tolist() == pytest.approx([1.0 + math.log(2)])


def test_word_view_of_only_stop_words_is_empty() -> None:
    idx, tf = text_features("the and of", "word")
    assert len(idx) == 0 and len(tf) == 0


def test_prefix_view_is_one_to_four_grams_of_a_start_marker_and_the_first_16_characters() -> None:
    idx, tf = text_features("ab", "prefix")
    grams = {"\x02", "a", "b", "\x02a", "ab", "\x02ab"}
    assert sorted(idx.tolist()) == sorted({bucket(g) for g in grams})
    assert tf.tolist() == [1.0] * len(idx)
    longer, _ = text_features("ab" + "z" * 30, "prefix")
    assert set(longer.tolist()) == set(text_features("ab" + "z" * 14, "prefix")[0].tolist())


def test_shape_view_counts_two_to_six_grams_of_the_skeleton() -> None:
    idx, tf = text_features("Ab", "shape")  # skeleton "Aa": the one 2-gram
    assert idx.tolist() == [bucket("Aa")]
    assert tf.tolist() == [1.0]


def test_features_asked_again_are_equal_and_cannot_be_changed_by_a_caller() -> None:
    idx, tf = text_features("Shared features, asked twice", "shape")
    again_idx, again_tf = text_features("Shared features, asked twice", "shape")
    assert idx.tolist() == again_idx.tolist() and tf.tolist() == again_tf.tolist()
    with pytest.raises(ValueError, match="read-only"):
        idx[0] = 0
    with pytest.raises(ValueError, match="read-only"):
        tf *= 2


def test_unknown_view_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown view"):
        text_features("x", "colour")


def test_unit_tfidf_weighs_rare_features_up_and_has_unit_norm() -> None:
    df = np.zeros(HASH_DIM, np.int32)
    df[bucket("cat")] = 9  # common
    vector = unit_tfidf("cat dog", "word", df, n_docs=10)
    weights = dict(zip(vector.idx.tolist(), vector.val.tolist(), strict=True))
    idf_cat = math.log(11 / 10) + 1
    idf_dog = math.log(11 / 1) + 1
    norm = math.hypot(idf_cat, idf_dog)
    assert weights[bucket("cat")] == pytest.approx(idf_cat / norm, rel=1e-6)
    assert weights[bucket("dog")] == pytest.approx(idf_dog / norm, rel=1e-6)


def test_unit_tfidf_of_an_empty_text_is_empty() -> None:
    vector = unit_tfidf("", "word", np.zeros(HASH_DIM, np.int32), 0)
    assert len(vector.idx) == 0


def test_brick_vector_is_the_normalised_sum_of_its_texts_vectors() -> None:
    df = np.zeros(HASH_DIM, np.int32)
    both = brick_vector(["cat", "dog"], "word", df, 2)
    weights = dict(zip(both.idx.tolist(), both.val.tolist(), strict=True))
    assert weights == pytest.approx({bucket("cat"): 1 / math.sqrt(2), bucket("dog"): 1 / math.sqrt(2)})
    same = brick_vector(["cat", "cat"], "word", df, 2)
    assert same.idx.tolist() == [bucket("cat")] and same.val.tolist() == pytest.approx([1.0])
    assert len(brick_vector([], "word", df, 2).idx) == 0


def test_sparse_vector_bytes_round_trip() -> None:
    vector = SparseVector(np.array([3, 70000], np.int32), np.array([0.25, -1.5], np.float32))
    back = SparseVector.from_bytes(*vector.to_bytes())
    assert back.idx.tolist() == [3, 70000] and back.val.tolist() == [0.25, -1.5]
