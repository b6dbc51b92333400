"""Lexical features for retrieval: hashed, sublinear TF-IDF vectors of three views of a text.

Dense MiniLM embeddings capture meaning but miss *format*: the held-out inputs of a task
often share a skeleton ("Question: ... Answer:", a list of 20 integers, a Romanian
sentence) that a sentence embedding blurs. Three cheap sparse views recover it:

* ``shape``: the text reduced to a skeleton (A-Z -> A, a-z -> a, 0-9 -> 9, non-ASCII -> U,
  punctuation kept, runs capped at 2), character 2-6-grams;
* ``prefix``: character 1-4-grams of a start marker plus the first 16 characters;
* ``word``: lower-cased words without English stop words (for descriptions).

Features are hashed (crc32) into ``HASH_DIM`` buckets; a text's vector is sublinear tf
(1 + ln count) times smoothed idf (``ln((1 + n) / (1 + df)) + 1``), L2-normalised. A brick's
vector for a view is the normalised sum of its texts' unit vectors. Document frequencies
count texts (descriptions and examples) and are updated incrementally.

Pure functions on numpy arrays; no I/O.
"""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

__all__ = [
    "HASH_DIM",
    "VIEWS",
    "SparseVector",
    "brick_vector",
    "idf",
    "shape_of",
    "text_features",
    "unit_tfidf",
]

HASH_DIM = 1 << 18
VIEWS = ("shape", "prefix", "word")

_UPPER, _LOWER, _DIGIT, _NON_ASCII = (
    re.compile(r"[A-Z]"),
    re.compile(r"[a-z]"),
    re.compile(r"[0-9]"),
    re.compile(r"[^\x00-\x7f]"),
)
_RUN = re.compile(r"(.)\1+")
_WORD = re.compile(r"(?u)\b\w\w+\b")

# scikit-learn's ENGLISH_STOP_WORDS (BSD-3-Clause), copied to avoid importing scikit-learn.
STOP_WORDS = frozenset(
    (
        "a", "about", "above", "across", "after", "afterwards", "again", "against", "all", "almost", "alone",
        "along", "already", "also", "although", "always", "am", "among", "amongst", "amoungst", "amount", "an",
        "and", "another", "any", "anyhow", "anyone", "anything", "anyway", "anywhere", "are", "around", "as",
        "at", "back", "be", "became", "because", "become", "becomes", "becoming", "been", "before",
        "beforehand", "behind", "being", "below", "beside", "besides", "between", "beyond", "bill", "both",
        "bottom", "but", "by", "call", "can", "cannot", "cant", "co", "con", "could", "couldnt", "cry", "de",
        "describe", "detail", "do", "done", "down", "due", "during", "each", "eg", "eight", "either", "eleven",
        "else", "elsewhere", "empty", "enough", "etc", "even", "ever", "every", "everyone", "everything",
        "everywhere", "except", "few", "fifteen", "fifty", "fill", "find", "fire", "first", "five", "for",
        "former", "formerly", "forty", "found", "four", "from", "front", "full", "further", "get", "give", "go",
        "had", "has", "hasnt", "have", "he", "hence", "her", "here", "hereafter", "hereby", "herein",
        "hereupon", "hers", "herself", "him", "himself", "his", "how", "however", "hundred", "i", "ie", "if",
        "in", "inc", "indeed", "interest", "into", "is", "it", "its", "itself", "keep", "last", "latter",
        "latterly", "least", "less", "ltd", "made", "many", "may", "me", "meanwhile", "might", "mill", "mine",
        "more", "moreover", "most", "mostly", "move", "much", "must", "my", "myself", "name", "namely",
        "neither", "never", "nevertheless", "next", "nine", "no", "nobody", "none", "noone", "nor", "not",
        "nothing", "now", "nowhere", "of", "off", "often", "on", "once", "one", "only", "onto", "or", "other",
        "others", "otherwise", "our", "ours", "ourselves", "out", "over", "own", "part", "per", "perhaps",
        "please", "put", "rather", "re", "same", "see", "seem", "seemed", "seeming", "seems", "serious",
        "several", "she", "should", "show", "side", "since", "sincere", "six", "sixty", "so", "some", "somehow",
        "someone", "something", "sometime", "sometimes", "somewhere", "still", "such", "system", "take", "ten",
        "than", "that", "the", "their", "them", "themselves", "then", "thence", "there", "thereafter",
        "thereby", "therefore", "therein", "thereupon", "these", "they", "thick", "thin", "third", "this",
        "those", "though", "three", "through", "throughout", "thru", "thus", "to", "together", "too", "top",
        "toward", "towards", "twelve", "twenty", "two", "un", "under", "until", "up", "upon", "us", "very",
        "via", "was", "we", "well", "were", "what", "whatever", "when", "whence", "whenever", "where",
        "whereafter", "whereas", "whereby", "wherein", "whereupon", "wherever", "whether", "which", "while",
        "whither", "who", "whoever", "whole", "whom", "whose", "why", "will", "with", "within", "without",
        "would", "yet", "you", "your", "yours", "yourself", "yourselves",
    )
)  # fmt: skip


@dataclass(frozen=True)
class SparseVector:
    """Hashed sparse vector: sorted bucket indices and their values."""

    idx: np.ndarray
    val: np.ndarray

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(indices as little-endian int32, values as little-endian float32)."""
        return self.idx.astype("<i4").tobytes(), self.val.astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, idx: bytes, val: bytes) -> SparseVector:
        """Inverse of `to_bytes`."""
        return cls(np.frombuffer(idx, dtype="<i4"), np.frombuffer(val, dtype="<f4"))


def shape_of(text: str) -> str:
    """The text's format skeleton (see the module docstring)."""
    text = _NON_ASCII.sub("U", _DIGIT.sub("9", _LOWER.sub("a", _UPPER.sub("A", text))))
    return _RUN.sub(r"\1\1", text)


def _features(text: str, view: str) -> list[str]:
    if view == "word":
        return [w for w in _WORD.findall(text.lower()) if w not in STOP_WORDS]
    if view == "shape":
        source, low, high = shape_of(text), 2, 6
    elif view == "prefix":
        source, low, high = "\x02" + text[:16], 1, 4
    else:
        raise ValueError(f"unknown view {view!r}")
    return [source[i : i + n] for n in range(low, high + 1) for i in range(len(source) - n + 1)]


def text_features(text: str, view: str) -> tuple[np.ndarray, np.ndarray]:
    """Hashed features of ``text`` in ``view``: (unique bucket indices, sublinear tf).

    The arrays are read-only and shared: a registration asks for the features of each of
    its texts three times (document frequencies read, added, and the brick's vectors), and
    hashing the n-grams was about a sixth of the registration's time outside the embedding."""
    return _cached_features(text, view)


@functools.lru_cache(maxsize=2048)
def _cached_features(text: str, view: str) -> tuple[np.ndarray, np.ndarray]:
    grams = _features(text, view)
    if not grams:
        idx, tf = np.zeros(0, np.int32), np.zeros(0, np.float32)
    else:
        hashed = np.fromiter((zlib.crc32(g.encode("utf-8")) & (HASH_DIM - 1) for g in grams), np.int64, len(grams))
        unique, counts = np.unique(hashed, return_counts=True)
        idx, tf = unique.astype(np.int32), (1.0 + np.log(counts)).astype(np.float32)
    idx.flags.writeable = False
    tf.flags.writeable = False
    return idx, tf


def idf(df: np.ndarray, n_docs: int) -> np.ndarray:
    """Smoothed inverse document frequency for document frequencies ``df``."""
    return (np.log((1.0 + n_docs) / (1.0 + df)) + 1.0).astype(np.float32)


def unit_tfidf(text: str, view: str, df: np.ndarray, n_docs: int) -> SparseVector:
    """The L2-normalised TF-IDF vector of ``text`` in ``view``."""
    idx, tf = text_features(text, view)
    weights = tf * idf(df[idx], n_docs)
    norm = float(np.linalg.norm(weights))
    return SparseVector(idx, weights / norm if norm > 0 else weights)


def brick_vector(texts: Iterable[str], view: str, df: np.ndarray, n_docs: int) -> SparseVector:
    """Normalised sum of the unit TF-IDF vectors of ``texts`` (a brick's vector in ``view``)."""
    parts = [unit_tfidf(t, view, df, n_docs) for t in texts]
    if not parts:
        return SparseVector(np.zeros(0, np.int32), np.zeros(0, np.float32))
    idx = np.concatenate([p.idx for p in parts])
    val = np.concatenate([p.val for p in parts])
    unique, inverse = np.unique(idx, return_inverse=True)
    summed = np.bincount(inverse, weights=val).astype(np.float32)
    norm = float(np.linalg.norm(summed))
    return SparseVector(unique.astype(np.int32), summed / norm if norm > 0 else summed)


def count_documents(texts: Iterable[str]) -> Mapping[str, np.ndarray]:
    """Per view, the bucket indices of every text, concatenated: adding 1 at each index
    (``np.add.at(df, idx, 1)``) counts these texts into the document frequencies."""
    texts = list(texts)
    return {
        view: np.concatenate([text_features(t, view)[0] for t in texts] or [np.zeros(0, np.int32)]) for view in VIEWS
    }
