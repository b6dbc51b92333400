"""Persistence of the retrieval index, inside the store's transactions: a brick's vectors
and lexical vectors, the corpus statistics, and the generation counter.

Every function takes the caller's session, so index rows change atomically with the
brick rows they belong to.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from registry.db.models import BrickLexicalRow, BrickVectorRow, IndexStateRow, RetrievalDfRow, RetrievalStatsRow
from registry.errors import ServiceUnavailable
from registry.search.lexical import HASH_DIM, VIEWS, SparseVector, count_documents
from registry.search.ranking import CorpusStats, IndexedTexts, index_brick_texts, stats_delta

__all__ = [
    "EmbeddedTexts",
    "bump_generation",
    "check_index_model",
    "read_df_changes",
    "read_generation",
    "read_index_model",
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


def bump_generation(session: Session) -> int:
    """Mark the index changed (in-process indexes of other processes reload); the new
    generation. Its row stays locked until commit, so generations commit in order."""
    result = session.execute(
        update(IndexStateRow)
        .where(IndexStateRow.id == 1)
        .values(generation=IndexStateRow.generation + 1)
        .returning(IndexStateRow.generation)
    )
    return int(result.scalar_one())


def read_generation(session: Session) -> int:
    """The current generation."""
    return int(session.scalar(select(IndexStateRow.generation).where(IndexStateRow.id == 1)) or 0)


def read_index_model(session: Session) -> str | None:
    """The embedding model of the stored vectors (None before the first brick), without
    reading the statistics (megabytes of document frequencies)."""
    row = session.execute(
        select(RetrievalStatsRow.model, RetrievalStatsRow.dim).where(RetrievalStatsRow.id == 1)
    ).first()
    return row.model if row is not None and row.dim is not None else None


def read_stats(
    session: Session, *, for_update: bool = False, texts: Iterable[str] = ()
) -> tuple[str | None, CorpusStats | None]:
    """(model, statistics) as stored; statistics are None before the first brick.

    Document frequencies are read only at the features of ``texts`` (what scoring those
    texts needs; see `CorpusStats`); ``for_update`` locks the statistics row.
    """
    query = select(RetrievalStatsRow).where(RetrievalStatsRow.id == 1)
    if for_update:
        query = query.with_for_update()
    row = session.scalar(query)
    if row is None or row.model is None or row.dim is None:
        return None, None
    stats = CorpusStats(
        example_sum=_array(row.example_sum, np.float64, row.dim),
        example_count=int(row.example_count),
        df=_read_doc_freqs(session, texts),
        n_docs=int(row.n_docs),
        layer_sum=_array(row.layer_sum, np.float64, row.dim),
        layer_sumsq=_array(row.layer_sumsq, np.float64, row.dim),
    )
    return row.model, stats


def _read_doc_freqs(session: Session, texts: Iterable[str]) -> dict[str, np.ndarray]:
    """Per view, a dense array of document frequencies, filled at the features of ``texts``
    (zero elsewhere)."""
    dense = {view: np.zeros(HASH_DIM, np.int32) for view in VIEWS}
    wanted = {view: np.unique(idx).tolist() for view, idx in count_documents(texts).items()}
    for view, counts in _read_bucket_counts(session, wanted).items():
        for bucket, count in counts.items():
            dense[view][bucket] = count
    return dense


def _read_bucket_counts(session: Session, wanted: Mapping[str, Sequence[int]]) -> dict[str, dict[int, int]]:
    """Per view, the document frequency of each wanted bucket that any text contains."""
    found: dict[str, dict[int, int]] = {view: {} for view in wanted}
    for view, buckets in wanted.items():
        if len(buckets):
            rows = session.execute(
                _READ_COUNTS[_dialect(session)], {"view": view, "buckets": _array_param(session, buckets)}
            )
            found[view].update((int(bucket), int(count)) for bucket, count in rows)
    return found


def _write_doc_freqs(session: Session, df_idx: Mapping[str, np.ndarray], sign: int, generation: int) -> None:
    """Add (``sign=1``) or remove (``-1``) texts' features: ``df_idx`` holds, per view,
    each bucket once per text containing it."""
    for view, idx in df_idx.items():
        buckets, counts = np.unique(idx, return_counts=True)
        _add_counts(session, view, buckets, counts * sign, generation)


def _add_counts(session: Session, view: str, buckets: np.ndarray, counts: np.ndarray, generation: int) -> None:
    """Add ``counts`` to the document frequencies of ``buckets``, stamping ``generation``.
    One statement per view whatever the number of buckets (thousands for long examples)."""
    if len(buckets):
        params = {
            "view": view,
            "buckets": _array_param(session, buckets.tolist()),
            "counts": _array_param(session, counts.tolist()),
            "generation": generation,
        }
        session.execute(_ADD_COUNTS[_dialect(session)], params)


def read_df_changes(session: Session, since: int) -> list[tuple[str, int, int]]:
    """(view, bucket, count) of every document frequency changed after generation ``since``."""
    rows = session.execute(
        select(RetrievalDfRow.view, RetrievalDfRow.bucket, RetrievalDfRow.count).where(
            RetrievalDfRow.generation > since
        )
    )
    return [(view, int(bucket), int(count)) for view, bucket, count in rows]


def _dialect(session: Session) -> str:
    return "postgresql" if session.get_bind().dialect.name == "postgresql" else "sqlite"


def _array_param(session: Session, values: Sequence[int]) -> object:
    """A list of integers as one bound parameter: an array on PostgreSQL, JSON on SQLite."""
    return list(values) if _dialect(session) == "postgresql" else json.dumps(list(values))


_READ_COUNTS = {
    "postgresql": text("SELECT bucket, count FROM retrieval_df WHERE view = :view AND bucket = ANY(:buckets)"),
    "sqlite": text(
        "SELECT bucket, count FROM retrieval_df WHERE view = :view "
        "AND bucket IN (SELECT value FROM json_each(:buckets))"
    ),
}
_ADD_COUNTS = {
    "postgresql": text(
        "INSERT INTO retrieval_df (view, bucket, count, generation) "
        "SELECT :view, b, c, :generation "
        "FROM unnest(CAST(:buckets AS integer[]), CAST(:counts AS integer[])) AS t(b, c) "
        "ON CONFLICT (view, bucket) DO UPDATE "
        "SET count = retrieval_df.count + excluded.count, generation = excluded.generation"
    ),
    "sqlite": text(
        "INSERT INTO retrieval_df (view, bucket, count, generation) "
        "SELECT :view, b.value, c.value, :generation "
        "FROM json_each(:buckets) AS b JOIN json_each(:counts) AS c ON b.key = c.key "
        "WHERE true ON CONFLICT (view, bucket) DO UPDATE "
        "SET count = retrieval_df.count + excluded.count, generation = excluded.generation"
    ),
}


def _array(raw: bytes | None, dtype: type, size: int) -> np.ndarray:
    if raw is None:
        return np.zeros(size, dtype)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)


def _write_stats(session: Session, model: str | None, dim: int | None, stats: CorpusStats | None) -> None:
    """The statistics row (document frequencies are written by `_write_doc_freqs`)."""
    values: dict[str, object] = {"model": model, "dim": dim}
    if stats is None:
        values.update(n_docs=0, example_count=0, example_sum=None, layer_sum=None, layer_sumsq=None)
    else:
        values.update(
            n_docs=stats.n_docs,
            example_count=stats.example_count,
            example_sum=stats.example_sum.astype("<f8").tobytes(),
            layer_sum=stats.layer_sum.astype("<f8").tobytes(),
            layer_sumsq=stats.layer_sumsq.astype("<f8").tobytes(),
        )
    session.execute(update(RetrievalStatsRow).where(RetrievalStatsRow.id == 1).values(**values))


def check_index_model(stored: str | None, model: str) -> None:
    """Raise `ServiceUnavailable` when the index holds vectors of another model than ``model``
    (``stored`` None: the index is empty, any model may start it)."""
    if stored is not None and stored != model:
        raise ServiceUnavailable(
            f"the search index was built with embedding model {stored}, not {model}; "
            "run `brickyard reindex` to re-embed every brick",
            extra={"index_model": stored, "model": model},
        )


def _current_stats(session: Session, embedded: EmbeddedTexts) -> CorpusStats:
    model, stats = read_stats(session, for_update=True, texts=[embedded.description, *embedded.examples])
    if stats is None:
        return CorpusStats.empty(embedded.dim)
    check_index_model(model, embedded.model)
    return stats


def write_brick_index(session: Session, brick_id: int, embedded: EmbeddedTexts) -> None:
    """Add a brick's vectors and lexical vectors, and its share of the statistics."""
    stats = _current_stats(session, embedded)
    indexed, after = _index_brick(session, brick_id, embedded, stats)
    _write_stats(session, embedded.model, embedded.dim, after)
    _write_doc_freqs(session, indexed.delta.df_idx, 1, bump_generation(session))


def rebuild_index(session: Session, bricks: Sequence[tuple[int, EmbeddedTexts]]) -> None:
    """Replace the whole index by these bricks' entries (statistics written once)."""
    generation = bump_generation(session)
    session.execute(delete(BrickVectorRow))
    session.execute(delete(BrickLexicalRow))
    # Zero, not delete: mirrors of the counts in other processes must see the change.
    session.execute(update(RetrievalDfRow).values(count=0, generation=generation))
    stats: CorpusStats | None = None
    model: str | None = None
    for brick_id, embedded in bricks:
        if model is not None and embedded.model != model:
            raise ValueError("every brick of a rebuild must be embedded by one model")
        model = embedded.model
        stats = _index_brick(session, brick_id, embedded, stats or CorpusStats.empty(embedded.dim))[1]
    _write_stats(session, model, int(stats.example_sum.shape[0]) if stats is not None else None, stats)
    if stats is not None:  # every document frequency is known here: write the nonzero ones
        for view in VIEWS:
            buckets = np.flatnonzero(stats.df[view])
            _add_counts(session, view, buckets, stats.df[view][buckets], generation)


def _index_brick(
    session: Session, brick_id: int, embedded: EmbeddedTexts, stats: CorpusStats
) -> tuple[IndexedTexts, CorpusStats]:
    indexed, after = index_brick_texts(
        embedded.description, embedded.examples, embedded.ex_vecs, embedded.ex_layers, stats
    )
    _insert_rows(session, brick_id, embedded, indexed)
    return indexed, after


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
    generation = bump_generation(session)
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
            _write_doc_freqs(session, delta.df_idx, -1, generation)
    session.execute(delete(BrickVectorRow).where(BrickVectorRow.brick_id == brick_id))
    session.execute(delete(BrickLexicalRow).where(BrickLexicalRow.brick_id == brick_id))
