"""Persistence of the retrieval index, inside the store's transactions: a brick's vectors
and lexical vectors, the corpus statistics, and the generation counter.

Every function takes the caller's session, so index rows change atomically with the
brick rows they belong to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from registry.db.models import BrickLexicalRow, BrickVectorRow, IndexStateRow, RetrievalStatsRow
from registry.errors import ServiceUnavailable
from registry.lexical import HASH_DIM, VIEWS, SparseVector
from registry.retrieve import CorpusStats, IndexedTexts, index_brick_texts, stats_delta

__all__ = [
    "EmbeddedTexts",
    "bump_generation",
    "read_generation",
    "read_stats",
    "rebuild_index",
    "remove_brick_index",
    "write_brick_index",
]


@dataclass(frozen=True)
class EmbeddedTexts:
    """A brick's description and examples, embedded by ``model``."""

    model: str
    description: str
    examples: tuple[str, ...]
    desc_vec: np.ndarray
    ex_vecs: np.ndarray
    ex_layers: np.ndarray

    @property
    def dim(self) -> int:
        """Vector dimension."""
        return int(self.desc_vec.shape[0])


def bump_generation(session: Session) -> None:
    """Mark the index changed (in-process indexes of other processes reload)."""
    session.execute(update(IndexStateRow).where(IndexStateRow.id == 1).values(generation=IndexStateRow.generation + 1))


def read_generation(session: Session) -> int:
    """The current generation."""
    return int(session.scalar(select(IndexStateRow.generation).where(IndexStateRow.id == 1)) or 0)


def read_stats(session: Session, *, for_update: bool = False) -> tuple[str | None, CorpusStats | None]:
    """(model, statistics) as stored; statistics are None before the first brick."""
    query = select(RetrievalStatsRow).where(RetrievalStatsRow.id == 1)
    if for_update:
        query = query.with_for_update()
    row = session.scalar(query)
    if row is None or row.model is None or row.dim is None:
        return None, None
    df = {view: _array(getattr(row, f"df_{view}"), np.int32, HASH_DIM) for view in VIEWS}
    stats = CorpusStats(
        example_sum=_array(row.example_sum, np.float64, row.dim),
        example_count=int(row.example_count),
        df=df,
        n_docs=int(row.n_docs),
        layer_sum=_array(row.layer_sum, np.float64, row.dim),
        layer_sumsq=_array(row.layer_sumsq, np.float64, row.dim),
    )
    return row.model, stats


def _array(raw: bytes | None, dtype: type, size: int) -> np.ndarray:
    if raw is None:
        return np.zeros(size, dtype)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


def _write_stats(session: Session, model: str | None, dim: int | None, stats: CorpusStats | None) -> None:
    values: dict[str, object] = {"model": model, "dim": dim}
    if stats is None:
        values.update(
            n_docs=0,
            example_count=0,
            example_sum=None,
            layer_sum=None,
            layer_sumsq=None,
            **{f"df_{v}": None for v in VIEWS},
        )
    else:
        values.update(
            n_docs=stats.n_docs,
            example_count=stats.example_count,
            example_sum=stats.example_sum.astype("<f8").tobytes(),
            layer_sum=stats.layer_sum.astype("<f8").tobytes(),
            layer_sumsq=stats.layer_sumsq.astype("<f8").tobytes(),
            **{f"df_{v}": stats.df[v].astype("<i4").tobytes() for v in VIEWS},
        )
    session.execute(update(RetrievalStatsRow).where(RetrievalStatsRow.id == 1).values(**values))


def _current_stats(session: Session, embedded: EmbeddedTexts) -> CorpusStats:
    model, stats = read_stats(session, for_update=True)
    if stats is None:
        return CorpusStats.empty(embedded.dim)
    if model != embedded.model:
        raise ServiceUnavailable(
            f"the search index was built with embedding model {model}, not {embedded.model}; "
            "run `brickyard reindex` to re-embed every brick",
            extra={"index_model": model, "model": embedded.model},
        )
    return stats


def write_brick_index(session: Session, brick_id: int, embedded: EmbeddedTexts) -> None:
    """Add a brick's vectors and lexical vectors, and its share of the statistics."""
    stats = _current_stats(session, embedded)
    after = _index_brick(session, brick_id, embedded, stats)
    _write_stats(session, embedded.model, embedded.dim, after)
    bump_generation(session)


def rebuild_index(session: Session, bricks: Sequence[tuple[int, EmbeddedTexts]]) -> None:
    """Replace the whole index by these bricks' entries (statistics written once)."""
    session.execute(delete(BrickVectorRow))
    session.execute(delete(BrickLexicalRow))
    stats: CorpusStats | None = None
    model: str | None = None
    for brick_id, embedded in bricks:
        if model is not None and embedded.model != model:
            raise ValueError("every brick of a rebuild must be embedded by one model")
        model = embedded.model
        stats = _index_brick(session, brick_id, embedded, stats or CorpusStats.empty(embedded.dim))
    _write_stats(session, model, int(stats.example_sum.shape[0]) if stats is not None else None, stats)
    bump_generation(session)


def _index_brick(session: Session, brick_id: int, embedded: EmbeddedTexts, stats: CorpusStats) -> CorpusStats:
    indexed, after = index_brick_texts(
        embedded.description, embedded.examples, embedded.ex_vecs, embedded.ex_layers, stats
    )
    _insert_rows(session, brick_id, embedded, indexed)
    return after


def _insert_rows(session: Session, brick_id: int, embedded: EmbeddedTexts, indexed: IndexedTexts) -> None:
    rows = [_vector_row(brick_id, embedded, "description", 0, embedded.description, embedded.desc_vec)]
    rows += [
        _vector_row(brick_id, embedded, "example", i, text, vec)
        for i, (text, vec) in enumerate(zip(embedded.examples, embedded.ex_vecs, strict=True))
    ]
    session.add_all(rows)
    lexical: dict[str, bytes] = {}
    for view in VIEWS:
        vector: SparseVector = getattr(indexed, view)
        lexical[f"{view}_idx"], lexical[f"{view}_val"] = vector.to_bytes()
    lexical["layer_sum"] = indexed.delta.layer_sum.astype("<f8").tobytes()
    lexical["layer_sumsq"] = indexed.delta.layer_sumsq.astype("<f8").tobytes()
    session.add(BrickLexicalRow(brick_id=brick_id, **lexical))


def _vector_row(
    brick_id: int, embedded: EmbeddedTexts, kind: str, ordinal: int, text: str, vec: np.ndarray
) -> BrickVectorRow:
    return BrickVectorRow(
        brick_id=brick_id,
        kind=kind,
        ordinal=ordinal,
        text=text,
        model=embedded.model,
        dim=embedded.dim,
        embedding=np.asarray(vec, dtype=np.float32),
    )


def remove_brick_index(session: Session, brick_id: int, description: str, examples: Sequence[str]) -> None:
    """Remove a brick's vectors, lexical vectors and share of the statistics."""
    model, stats = read_stats(session, for_update=True)
    rows = session.scalars(
        select(BrickVectorRow).where(BrickVectorRow.brick_id == brick_id, BrickVectorRow.kind == "example")
    ).all()
    if stats is not None:
        current = [r for r in rows if r.model == model]
        ex_vecs = (
            np.stack([r.embedding for r in sorted(current, key=lambda r: r.ordinal)])
            if current
            else np.zeros((0, stats.example_sum.shape[0]), np.float32)
        )
        lexical = session.get(BrickLexicalRow, brick_id)
        if len(ex_vecs) == len(examples) and lexical is not None:
            dim = int(stats.example_sum.shape[0])
            delta = replace(
                stats_delta(description, examples, ex_vecs, np.zeros((0, dim), np.float32)),
                layer_sum=_array(lexical.layer_sum, np.float64, dim),
                layer_sumsq=_array(lexical.layer_sumsq, np.float64, dim),
            )
            stats = stats.apply(delta, sign=-1)
            _write_stats(session, model, dim, stats)
    session.execute(delete(BrickVectorRow).where(BrickVectorRow.brick_id == brick_id))
    session.execute(delete(BrickLexicalRow).where(BrickLexicalRow.brick_id == brick_id))
    bump_generation(session)
