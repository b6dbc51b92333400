"""Ranking bricks for a query: pure scoring, plus what each brick contributes to the index.

A query is either a task description ("translate customer emails from Romanian to
English") or a raw example input (a pasted review). The two want different evidence, so a
brick is scored by two branches and a gate decides between them *from the query itself*:

* description branch ``D = lam * (cos(q, desc) + beta * word(q, desc))``;
* example branch ``E = a * (cos_c(q, mean(examples)) + w_shape * shape(q, examples)
  + w_prefix * prefix(q, examples) + w_layer * layer(q, examples))``, where ``cos_c`` is the
  cosine after subtracting the corpus mean of example vectors ``mu`` (removing the
  direction all inputs share), ``shape``/``prefix``/``word`` are cosines of the lexical
  views (`registry.search.lexical`), and ``layer`` is the cosine between the query's and the
  examples' mean-pooled hidden states of MiniLM's layer 4 (of 6), standardised per
  dimension over all registered examples: the last layer is tuned for meaning, an
  intermediate one still carries surface form (script, casing, markup, list skeleton),
  which is what separates inputs of different tasks on the same topic;
* gate ``alpha = sigmoid((max_b cos(q, desc_b) - max_example_sim - g0) / s)``: when the
  query is closer to some description than to any example, it reads as a description;
* ``score = alpha * D + (1 - alpha) * E``.

Candidates are the bricks owning the top-N vectors (descriptions and examples alike) by
cosine; ``max_example_sim`` is the best example cosine among those hits. The constants
were fitted on registered examples only (leave-one-out), and results are flat within
+/-50% of each (see ``bench/retrieval_quality.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from registry.search.lexical import HASH_DIM, VIEWS, SparseVector, brick_vector, text_features, unit_tfidf

__all__ = [
    "RANKING",
    "Branches",
    "BrickFeatures",
    "CorpusStats",
    "Ranked",
    "RankingParams",
    "StatsDelta",
    "index_brick_texts",
    "rank_bricks",
    "score_branches",
]


@dataclass(frozen=True)
class RankingParams:
    """Weights of the scoring (module docstring)."""

    a: float = 7.3
    w_shape: float = 1.0
    w_prefix: float = 0.3
    w_layer: float = 1.0
    lam: float = 13.0
    beta: float = 0.2
    g0: float = 0.02
    s: float = 0.02


RANKING = RankingParams()


@dataclass(frozen=True)
class BrickFeatures:
    """What scoring needs of one brick."""

    brick_id: int
    desc_vec: np.ndarray
    ex_vecs: np.ndarray
    shape: SparseVector
    prefix: SparseVector
    word: SparseVector
    layer_mean: np.ndarray | None = None
    ex_mean: np.ndarray | None = None  # mean of ex_vecs; computed once when the index loads the brick


@dataclass(frozen=True)
class CorpusStats:
    """Corpus-wide statistics: mean example vector, per-view document frequencies, layer
    moments.

    ``df`` holds dense per-view arrays, but the store fills them only at the features of the
    texts being scored (a query, or the brick being indexed): the only entries any scoring
    function reads. A corpus-wide array is never loaded.
    """

    example_sum: np.ndarray
    example_count: int
    df: Mapping[str, np.ndarray]
    n_docs: int
    layer_sum: np.ndarray
    layer_sumsq: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> CorpusStats:
        """Statistics of an empty corpus."""
        zeros = np.zeros(dim, np.float64)
        return cls(zeros, 0, {v: np.zeros(HASH_DIM, np.int32) for v in VIEWS}, 0, zeros, zeros)

    @property
    def mu(self) -> np.ndarray:
        """Mean of all example vectors (zeros when there are none)."""
        return (self.example_sum / max(self.example_count, 1)).astype(np.float32)

    def layer_moments(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-dimension mean and standard deviation of the examples' layer vectors."""
        n = max(self.example_count, 1)
        mean = self.layer_sum / n
        std = np.sqrt(np.maximum(self.layer_sumsq / n - mean * mean, 0.0)) + 1e-6
        return mean.astype(np.float32), std.astype(np.float32)

    def apply(self, delta: StatsDelta, sign: int = 1) -> CorpusStats:
        """These statistics with ``delta`` added (``sign=1``) or removed (``sign=-1``)."""
        df = {v: self.df[v].copy() for v in VIEWS}
        for view in VIEWS:
            np.add.at(df[view], delta.df_idx[view], sign)
        return CorpusStats(
            example_sum=self.example_sum + sign * delta.example_sum,
            example_count=self.example_count + sign * delta.example_count,
            df=df,
            n_docs=self.n_docs + sign * delta.n_docs,
            layer_sum=self.layer_sum + sign * delta.layer_sum,
            layer_sumsq=self.layer_sumsq + sign * delta.layer_sumsq,
        )


@dataclass(frozen=True)
class StatsDelta:
    """What one brick's texts add to the corpus statistics."""

    example_sum: np.ndarray
    example_count: int
    df_idx: Mapping[str, np.ndarray]
    n_docs: int
    layer_sum: np.ndarray
    layer_sumsq: np.ndarray


@dataclass(frozen=True)
class IndexedTexts:
    """A brick's lexical vectors, the mean of its examples' layer vectors, and its
    contribution to the statistics."""

    shape: SparseVector
    prefix: SparseVector
    word: SparseVector
    layer_mean: np.ndarray
    delta: StatsDelta = field(repr=False)


def stats_delta(description: str, examples: Sequence[str], ex_vecs: np.ndarray, ex_layers: np.ndarray) -> StatsDelta:
    """The statistics contribution of a brick's texts (description and examples)."""
    texts = [description, *examples]
    df_idx = {view: np.concatenate([text_features(t, view)[0] for t in texts]) for view in VIEWS}
    vecs = ex_vecs.astype(np.float64)
    layers = ex_layers.astype(np.float64)
    return StatsDelta(
        example_sum=vecs.sum(axis=0),
        example_count=len(ex_vecs),
        df_idx=df_idx,
        n_docs=len(texts),
        layer_sum=layers.sum(axis=0),
        layer_sumsq=(layers * layers).sum(axis=0),
    )


def index_brick_texts(
    description: str, examples: Sequence[str], ex_vecs: np.ndarray, ex_layers: np.ndarray, stats: CorpusStats
) -> tuple[IndexedTexts, CorpusStats]:
    """Lexical vectors and layer mean of a new brick, and the statistics including it.

    The brick's vectors use the idf of the corpus *with* the brick; existing bricks keep
    the idf of their own insertion (measured: refreshing them changes nothing).
    """
    delta = stats_delta(description, examples, ex_vecs, ex_layers)
    after = stats.apply(delta)
    dim = ex_layers.shape[1]
    indexed = IndexedTexts(
        shape=brick_vector(examples, "shape", after.df["shape"], after.n_docs),
        prefix=brick_vector(examples, "prefix", after.df["prefix"], after.n_docs),
        word=unit_tfidf(description, "word", after.df["word"], after.n_docs),
        layer_mean=ex_layers.mean(axis=0).astype(np.float32) if len(ex_layers) else np.zeros(dim, np.float32),
        delta=delta,
    )
    return indexed, after


@dataclass(frozen=True)
class Ranked:
    """One ranked brick: its score, what matched best and how well (cosine)."""

    brick_id: int
    score: float
    matched: str
    ordinal: int
    similarity: float


def _sparse_dots(query: SparseVector, vectors: Sequence[SparseVector]) -> np.ndarray:
    dense = np.zeros(HASH_DIM, np.float32)
    dense[query.idx] = query.val
    lengths = np.fromiter((len(v.idx) for v in vectors), np.int64, len(vectors))
    if lengths.sum() == 0:
        return np.zeros(len(vectors), np.float64)
    idx = np.concatenate([v.idx for v in vectors])
    val = np.concatenate([v.val for v in vectors])
    owner = np.repeat(np.arange(len(vectors)), lengths)
    return np.bincount(owner, weights=dense[idx] * val, minlength=len(vectors))


def _example_mean(brick: BrickFeatures) -> np.ndarray:
    return brick.ex_mean if brick.ex_mean is not None else brick.ex_vecs.mean(axis=0)


def _layer_scores(query_layer: np.ndarray, candidates: Sequence[BrickFeatures], stats: CorpusStats) -> np.ndarray:
    if stats.example_count == 0:
        return np.zeros(len(candidates))
    mean, std = stats.layer_moments()
    q = (query_layer.astype(np.float32) - mean) / std
    zero = np.zeros_like(q)
    present = np.array([c.layer_mean is not None and len(c.ex_vecs) > 0 for c in candidates])
    means = np.stack([(c.layer_mean - mean) / std if c.layer_mean is not None else zero for c in candidates])
    norms = np.linalg.norm(means, axis=1) * float(np.linalg.norm(q)) + 1e-12
    return np.where(present, (means @ q) / norms, 0.0)


@dataclass(frozen=True)
class Branches:
    """Per candidate: the cosine to its description, and the two branch scores."""

    s_desc: np.ndarray
    description: np.ndarray
    example: np.ndarray


def score_branches(
    query_vec: np.ndarray,
    query_text: str,
    candidates: Sequence[BrickFeatures],
    stats: CorpusStats,
    params: RankingParams = RANKING,
    *,
    query_layer: np.ndarray | None = None,
) -> Branches:
    """The description and example branch scores of every candidate (module docstring)."""
    q = query_vec.astype(np.float32)
    desc = np.stack([c.desc_vec for c in candidates]).astype(np.float32)
    s_desc = desc @ q
    mu = stats.mu
    dim = q.shape[0]
    zero = np.zeros(dim, np.float32)
    ex_means = np.stack([_example_mean(c) if len(c.ex_vecs) else zero for c in candidates])
    centred = ex_means - mu
    q_centred = q - mu
    norms = np.linalg.norm(centred, axis=1) * float(np.linalg.norm(q_centred)) + 1e-12
    has_examples = np.array([len(c.ex_vecs) > 0 for c in candidates])
    s_dense = np.where(has_examples, (centred @ q_centred) / norms, 0.0)
    lexical = {
        view: _sparse_dots(
            unit_tfidf(query_text, view, stats.df[view], stats.n_docs), [getattr(c, view) for c in candidates]
        )
        for view in VIEWS
    }
    s_layer = _layer_scores(query_layer, candidates, stats) if query_layer is not None else 0.0
    example_branch = params.a * (
        s_dense + params.w_shape * lexical["shape"] + params.w_prefix * lexical["prefix"] + params.w_layer * s_layer
    )
    description_branch = params.lam * (s_desc + params.beta * lexical["word"])
    return Branches(s_desc=s_desc, description=description_branch, example=example_branch)


def rank_bricks(
    query_vec: np.ndarray,
    query_text: str,
    candidates: Sequence[BrickFeatures],
    max_example_sim: float,
    stats: CorpusStats,
    params: RankingParams = RANKING,
    *,
    query_layer: np.ndarray | None = None,
) -> list[Ranked]:
    """Score candidate bricks for a query, best first (module docstring for the formula).

    Args:
        query_vec: the unit embedding of the query.
        query_text: the raw query (for the lexical views).
        query_layer: the query's unit layer vector (None: the layer view is left out).
        candidates: the bricks to score.
        max_example_sim: the best cosine between the query and an example vector among
            the candidate-generation hits.
        stats: corpus statistics (mean example vector, document frequencies).
        params: the weights.

    Returns:
        One `Ranked` per candidate, sorted by score (ties by brick id).
    """
    if not candidates:
        return []
    branches = score_branches(query_vec, query_text, candidates, stats, params, query_layer=query_layer)
    s_desc = branches.s_desc
    gap = float(s_desc.max()) - max_example_sim
    alpha = 1.0 / (1.0 + np.exp(-np.clip((gap - params.g0) / params.s, -50.0, 50.0)))
    scores = alpha * branches.description + (1.0 - alpha) * branches.example
    q = query_vec.astype(np.float32)
    ranked = []
    for position, candidate in enumerate(candidates):
        ex_sims = candidate.ex_vecs @ q if len(candidate.ex_vecs) else np.zeros(0, np.float32)
        if alpha >= 0.5 or len(ex_sims) == 0:
            matched, ordinal, similarity = "description", 0, float(s_desc[position])
        else:
            best = int(np.argmax(ex_sims))
            matched, ordinal, similarity = "example", best, float(ex_sims[best])
        ranked.append(Ranked(candidate.brick_id, float(scores[position]), matched, ordinal, similarity))
    ranked.sort(key=lambda r: (-r.score, r.brick_id))
    return ranked
