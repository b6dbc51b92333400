"""Backend-specific candidate generation for search.

`InMemoryIndex` (SQLite): every vector of the current model in one numpy matrix, searched
exactly; reloaded when the generation counter in the database moves (a write by any
process). Searches read an immutable snapshot, so concurrent requests are safe while a
reload builds the next one.

`PgVectorIndex` (PostgreSQL): the top-N vectors come from pgvector's HNSW index (or an
exact scan), with filters applied inside the query (iterative index scans keep N rows
coming when filters are selective); the candidates' vectors and lexical vectors are then
fetched by id.

Both return the same `Candidates`, which `registry.search.ranking.rank_bricks` scores.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from registry.db.models import BrickLexicalRow, BrickRow, BrickTagRow, BrickVectorRow
from registry.db.session import Database
from registry.search.index_rows import check_index_model, read_df_changes, read_generation, read_stats
from registry.search.lexical import HASH_DIM, VIEWS, SparseVector
from registry.search.ranking import BrickFeatures, CorpusStats

__all__ = ["Candidates", "InMemoryIndex", "PgVectorIndex", "SearchFilters", "SearchIndex", "make_index"]


@dataclass(frozen=True)
class SearchFilters:
    """Which bricks may be returned."""

    # Bricks of any of these base models (one base and its fingerprint twins); None: any base.
    base_model_ids: tuple[int, ...] | None = None
    tags: tuple[str, ...] = ()
    all_versions: bool = False
    kind: str | None = None  # "lora" | "emergent"; None: every kind


@dataclass(frozen=True)
class Candidates:
    """Candidate bricks for one query, with what the ranking needs."""

    features: list[BrickFeatures]
    max_example_sim: float
    stats: CorpusStats
    generation: int = -1  # of the data these candidates come from (-1: unknown)


class SearchIndex(Protocol):
    """Candidate generation over the stored vectors."""

    def candidates(
        self,
        query_vec: np.ndarray,
        *,
        model: str,
        filters: SearchFilters,
        n: int,
        max_bricks: int,
        exact: bool = False,
    ) -> Candidates: ...

    def invalidate(self) -> None: ...

    def doc_freqs(self, generation: int) -> dict[str, np.ndarray]:
        """Per view, dense document frequencies as of ``generation`` (or later)."""
        ...


class DocFreqMirror:
    """This process's copy of the document frequencies, kept current by reading only the
    rows changed since the generation it last saw (each row carries the generation of its
    last change). A search reads its query's counts from memory; a write costs the next
    search one small query. A copy is never changed once handed out (copy on write), so a
    search sees one generation throughout."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._seen = -1
        self._dense: dict[str, np.ndarray] = {view: np.zeros(HASH_DIM, np.int32) for view in VIEWS}

    def at(self, generation: int) -> dict[str, np.ndarray]:
        """Per view, dense document frequencies as of ``generation`` or later."""
        with self._lock:
            if generation >= 0 and generation <= self._seen:
                return self._dense
            with self.db.session() as session:
                # Rows up to a generation the caller has seen are committed; -1: look it up.
                seen = generation if generation >= 0 else read_generation(session)
                changes = read_df_changes(session, self._seen)
            if changes:
                dense = {view: array.copy() for view, array in self._dense.items()}
                for view, bucket, count in changes:
                    if view in dense:
                        dense[view][bucket] = count
                self._dense = dense
            self._seen = seen
            return self._dense

    def invalidate(self) -> None:
        """Forget everything; the next call reads every row."""
        with self._lock:
            self._seen = -1
            self._dense = {view: np.zeros(HASH_DIM, np.int32) for view in VIEWS}


def _max_example_sim(sims: np.ndarray, is_example: np.ndarray) -> float:
    """Best example cosine among the hits; without one, every example is below the last hit."""
    if len(sims) == 0:
        return -1.0
    examples = sims[is_example]
    return float(examples.max()) if len(examples) else float(sims.min())


def _check_model(session: Session, model: str) -> CorpusStats | None:
    stored_model, stats = read_stats(session)
    check_index_model(stored_model if stats is not None else None, model)
    return stats


_LEXICAL_COLUMNS = ("brick_id", *(f"{v}_{p}" for v in VIEWS for p in ("idx", "val")), "layer_sum")


def _lexical(row: Any) -> dict[str, Any]:
    """The lexical vectors and the layer sum of a brick (divided by its example count later)."""
    found: dict[str, Any] = {
        view: SparseVector.from_bytes(getattr(row, f"{view}_idx"), getattr(row, f"{view}_val")) for view in VIEWS
    }
    found["layer_sum"] = np.frombuffer(row.layer_sum, dtype="<f8")
    return found


def _features(brick_id: int, desc: np.ndarray, ex_vecs: np.ndarray, lexical: dict[str, Any]) -> BrickFeatures:
    layer_sum = lexical["layer_sum"]
    layer_mean = (layer_sum / len(ex_vecs)).astype(np.float32) if len(ex_vecs) and len(layer_sum) else None
    return BrickFeatures(
        brick_id,
        desc,
        ex_vecs,
        shape=lexical["shape"],
        prefix=lexical["prefix"],
        word=lexical["word"],
        layer_mean=layer_mean,
        ex_mean=ex_vecs.mean(axis=0).astype(np.float32) if len(ex_vecs) else None,
    )


# -- SQLite: exact, in memory -----------------------------------------------------------


@dataclass(frozen=True)
class _Snapshot:
    generation: int
    model: str
    max_vector_id: int  # vectors with a larger id were written after this snapshot
    bricks: dict[int, BrickFeatures]  # everything below is derived from this
    matrix: np.ndarray  # (vectors, dim) float32
    owner: np.ndarray  # (vectors,) position of the owning brick
    is_example: np.ndarray  # (vectors,) bool
    brick_ids: np.ndarray  # (bricks,)
    latest: np.ndarray  # (bricks,) bool
    base_ids: np.ndarray  # (bricks,)
    kinds: np.ndarray  # (bricks,) str
    tags: dict[str, np.ndarray]  # tag -> bool mask over bricks
    features: list[BrickFeatures]
    stats: CorpusStats


class InMemoryIndex:
    """Exact search over every vector, held in memory (the SQLite backend).

    When the generation moves, the snapshot is refreshed incrementally: vector rows are
    append-only (an edit deletes a brick's rows and writes new ones), so only rows newer
    than the snapshot's last vector id, and the bricks that own them, are read; deleted
    bricks drop out; flags and tags are re-read (a few integers per brick).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._doc_freqs = DocFreqMirror(db)
        self._snapshot: _Snapshot | None = None
        self._verified: tuple[int, _Snapshot] | None = None  # (change marker, snapshot current then)
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """Drop the snapshot; the next search reloads."""
        self._verified = None
        self._snapshot = None
        self._doc_freqs.invalidate()

    def doc_freqs(self, generation: int) -> dict[str, np.ndarray]:
        """Per view, dense document frequencies as of ``generation`` (or later)."""
        return self._doc_freqs.at(generation)

    def _current(self, model: str) -> _Snapshot:
        # No commit since the snapshot was last found current: it still is (no query needed).
        marker = self.db.change_marker()
        verified = self._verified
        if marker is not None and verified is not None and verified[0] == marker and verified[1].model == model:
            return verified[1]
        with self.db.session() as session:
            generation = read_generation(session)  # read after the marker: at least as new
        snapshot = self._snapshot
        if snapshot is None or snapshot.generation != generation or snapshot.model != model:
            with self._lock:
                snapshot = self._snapshot
                if snapshot is None or snapshot.generation != generation or snapshot.model != model:
                    previous = snapshot if snapshot is not None and snapshot.model == model else None
                    snapshot = self._load(model, previous)
                    self._snapshot = snapshot
        if marker is not None and snapshot.generation == generation:
            self._verified = (marker, snapshot)
        return snapshot

    def _load(self, model: str, previous: _Snapshot | None) -> _Snapshot:
        since = previous.max_vector_id if previous is not None else 0
        with self.db.session() as session:
            generation = read_generation(session)
            stats = _check_model(session, model)
            vectors = session.execute(
                select(BrickVectorRow.id, BrickVectorRow.brick_id, BrickVectorRow.kind, BrickVectorRow.embedding)
                .where(BrickVectorRow.model == model, BrickVectorRow.id > since)
                .order_by(BrickVectorRow.brick_id, BrickVectorRow.kind, BrickVectorRow.ordinal)
            ).all()
            bricks = session.execute(
                select(BrickRow.id, BrickRow.is_latest, BrickRow.base_model_id, BrickRow.kind)
            ).all()
            tag_rows = session.execute(select(BrickTagRow.brick_id, BrickTagRow.tag)).all()
            changed = {row.brick_id for row in vectors}
            lexical_query = select(BrickLexicalRow)
            if previous is not None and len(changed) <= 5000:
                lexical_query = lexical_query.where(BrickLexicalRow.brick_id.in_(changed))
            lexical = (
                {row.brick_id: _lexical(row) for row in session.scalars(lexical_query)}
                if changed or previous is None
                else {}
            )
        dim = len(vectors[0].embedding) if vectors else (previous.matrix.shape[1] if previous is not None else 1)
        stats = stats or CorpusStats.empty(dim)
        by_brick: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for _, brick_id, kind, embedding in vectors:
            descs, examples = by_brick.setdefault(brick_id, ([], []))
            (descs if kind == "description" else examples).append(embedding)
        meta = {row.id: row for row in bricks}
        features_by_id = {k: v for k, v in (previous.bricks.items() if previous is not None else ()) if k in meta}
        for brick_id, (descs, examples) in by_brick.items():
            if brick_id in meta and brick_id in lexical and descs:
                ex_vecs = np.stack(examples) if examples else np.zeros((0, dim), np.float32)
                features_by_id[brick_id] = _features(brick_id, descs[0], ex_vecs, lexical[brick_id])
        max_id = max([since, *(row.id for row in vectors)])
        return _build_snapshot(generation, model, max_id, features_by_id, meta, tag_rows, stats, dim)

    def candidates(
        self,
        query_vec: np.ndarray,
        *,
        model: str,
        filters: SearchFilters,
        n: int,
        max_bricks: int,
        exact: bool = True,
    ) -> Candidates:
        """The first ``max_bricks`` bricks owning the top-``n`` eligible vectors (exact here)."""
        snap = self._current(model)
        eligible = np.ones(len(snap.brick_ids), bool)
        if not filters.all_versions:
            eligible &= snap.latest
        if filters.base_model_ids is not None:
            eligible &= np.isin(snap.base_ids, np.asarray(filters.base_model_ids, np.int64))
        if filters.kind is not None:
            eligible &= snap.kinds == filters.kind
        for tag in filters.tags:
            eligible &= snap.tags.get(tag, np.zeros(len(snap.brick_ids), bool))
        vector_ok = eligible[snap.owner] if len(snap.owner) else np.zeros(0, bool)
        count = int(vector_ok.sum())
        if count == 0:
            return Candidates([], -1.0, snap.stats, snap.generation)
        sims = snap.matrix @ query_vec.astype(np.float32)
        sims[~vector_ok] = -np.inf
        n = min(n, count)
        top = np.argpartition(-sims, n - 1)[:n] if len(sims) > n else np.arange(len(sims))
        top = top[np.lexsort((top, -sims[top]))]
        max_example = _max_example_sim(sims[top], snap.is_example[top])
        positions = list(dict.fromkeys(snap.owner[top].tolist()))[:max_bricks]
        return Candidates([snap.features[p] for p in positions], max_example, snap.stats, snap.generation)


def _build_snapshot(
    generation: int,
    model: str,
    max_vector_id: int,
    bricks: dict[int, BrickFeatures],
    meta: dict[int, Any],
    tag_rows: Sequence[Any],
    stats: CorpusStats,
    dim: int,
) -> _Snapshot:
    ids = sorted(bricks)
    features = [bricks[i] for i in ids]
    blocks = [np.vstack([f.desc_vec[None, :], f.ex_vecs]) for f in features]
    counts = np.fromiter((len(b) for b in blocks), np.int64, len(blocks))
    owner = np.repeat(np.arange(len(ids)), counts)
    is_example = np.ones(int(counts.sum()), bool)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64) if len(counts) else np.zeros(0, np.int64)
    is_example[starts] = False
    position_of = {brick_id: i for i, brick_id in enumerate(ids)}
    tags: dict[str, np.ndarray] = {}
    for brick_id, tag in tag_rows:
        if brick_id in position_of:
            tags.setdefault(tag, np.zeros(len(ids), bool))[position_of[brick_id]] = True
    return _Snapshot(
        generation=generation,
        model=model,
        max_vector_id=max_vector_id,
        bricks=bricks,
        matrix=np.vstack(blocks).astype(np.float32, copy=False) if blocks else np.zeros((0, dim), np.float32),
        owner=owner,
        is_example=is_example,
        brick_ids=np.asarray(ids, np.int64),
        latest=np.asarray([meta[i].is_latest for i in ids], bool),
        base_ids=np.asarray([meta[i].base_model_id for i in ids], np.int64),
        kinds=np.asarray([meta[i].kind for i in ids], dtype=object),
        tags=tags,
        features=features,
        stats=stats,
    )


# -- PostgreSQL: pgvector ---------------------------------------------------------------


class PgVectorIndex:
    """Candidates from pgvector (HNSW, or an exact scan), features fetched by id.

    The features of recently seen bricks are kept in a bounded LRU cache. Vector rows are
    append-only (an edit writes new rows), so when the generation moves, the bricks that
    own rows newer than the last one seen are dropped from the cache; deleted bricks are
    never candidates again, so their entries just age out.
    """

    def __init__(self, db: Database, *, cache_bricks: int = 20_000) -> None:
        self.db = db
        self._doc_freqs = DocFreqMirror(db)
        self._stats: tuple[int, str, CorpusStats] | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, BrickFeatures] = OrderedDict()
        self._cache_limit = cache_bricks
        self._seen: tuple[int, str, int] | None = None  # generation, model, max vector id

    def doc_freqs(self, generation: int) -> dict[str, np.ndarray]:
        """Per view, dense document frequencies as of ``generation`` (or later)."""
        return self._doc_freqs.at(generation)

    def invalidate(self) -> None:
        """Drop cached statistics and features."""
        self._doc_freqs.invalidate()
        with self._lock:
            self._stats = None
            self._cache.clear()
            self._seen = None

    def _refresh(self, session: Session, model: str, dim: int) -> tuple[int, CorpusStats]:
        generation = read_generation(session)
        with self._lock:
            seen, cached = self._seen, self._stats
        if seen is not None and cached is not None and seen[0] == generation and seen[1] == model:
            return generation, cached[2]
        stats = _check_model(session, model) or CorpusStats.empty(dim)
        since = seen[2] if seen is not None and seen[1] == model else None
        newest = int(session.scalar(text("SELECT coalesce(max(id), 0) FROM brick_vectors")) or 0)
        changed: list[int] = []
        if since is not None:
            changed = list(
                session.scalars(text("SELECT DISTINCT brick_id FROM brick_vectors WHERE id > :since"), {"since": since})
            )
        with self._lock:
            if since is None:
                self._cache.clear()
            for brick_id in changed:
                self._cache.pop(brick_id, None)
            self._stats = (generation, model, stats)
            self._seen = (generation, model, newest)
        return generation, stats

    def candidates(
        self,
        query_vec: np.ndarray,
        *,
        model: str,
        filters: SearchFilters,
        n: int,
        max_bricks: int,
        exact: bool = False,
    ) -> Candidates:
        """The first ``max_bricks`` bricks owning the top-``n`` eligible vectors by cosine
        (only those bricks' features are fetched)."""
        dim = int(query_vec.shape[0])
        query = "[" + ",".join(f"{x:.8g}" for x in query_vec.tolist()) + "]"
        conditions = ["v.model = :model", f"v.dim = {dim}"]
        params: dict[str, object] = {"model": model, "q": query, "n": n}
        if not filters.all_versions:
            conditions.append("b.is_latest")
        if filters.base_model_ids is not None:
            names = [f":base_id{i}" for i in range(len(filters.base_model_ids))]
            conditions.append(f"b.base_model_id IN ({', '.join(names)})" if names else "FALSE")
            params.update({f"base_id{i}": base_id for i, base_id in enumerate(filters.base_model_ids)})
        if filters.kind is not None:
            conditions.append("b.kind = :kind")
            params["kind"] = filters.kind
        for i, tag in enumerate(filters.tags):
            conditions.append(f"EXISTS (SELECT 1 FROM brick_tags t WHERE t.brick_id = b.id AND t.tag = :tag{i})")
            params[f"tag{i}"] = tag
        # The HNSW index is on the expression embedding::vector(dim); ordering by the bare
        # column cannot use it, which gives the exact scan.
        distance = (
            "(v.embedding <=> CAST(:q AS vector))"
            if exact
            else f"(v.embedding::vector({dim}) <=> CAST(:q AS vector({dim})))"
        )
        sql = text(
            f"SELECT v.brick_id, v.kind, 1 - {distance} AS sim FROM brick_vectors v "
            f"JOIN bricks b ON b.id = v.brick_id WHERE {' AND '.join(conditions)} "
            f"ORDER BY {distance}, v.id LIMIT :n"
        )
        with self.db.session() as session:
            generation, stats = self._refresh(session, model, dim)
            if not exact:  # both settings in one round trip (SET LOCAL takes one each)
                session.execute(
                    text(
                        "SELECT set_config('hnsw.ef_search', :ef, true), "
                        "set_config('hnsw.iterative_scan', 'relaxed_order', true)"
                    ),
                    {"ef": str(max(40, min(1000, n)))},
                )
            hits = session.execute(sql, params).all()
            if not hits:
                return Candidates([], -1.0, stats, generation)
            hits = sorted(hits, key=lambda h: -h.sim)
            sims = np.asarray([h.sim for h in hits], np.float64)
            max_example = _max_example_sim(sims, np.asarray([h.kind == "example" for h in hits]))
            ids = list(dict.fromkeys(h.brick_id for h in hits))[:max_bricks]
            with self._lock:
                features = {i: self._cache[i] for i in ids if i in self._cache}
            missing = [i for i in ids if i not in features]
            if missing:
                fetched = self._fetch(session, missing, model, dim)
                features.update(fetched)
                with self._lock:
                    self._cache.update(fetched)
                    while len(self._cache) > self._cache_limit:
                        self._cache.popitem(last=False)
            with self._lock:
                for i in ids:
                    if i in self._cache:
                        self._cache.move_to_end(i)
        return Candidates([features[i] for i in ids if i in features], max_example, stats, generation)

    def _fetch(self, session: Session, ids: Sequence[int], model: str, dim: int) -> dict[int, BrickFeatures]:
        rows = session.execute(
            text(
                "SELECT brick_id, kind, ordinal, vector_send(embedding) AS raw FROM brick_vectors "
                "WHERE brick_id IN :ids AND model = :model ORDER BY brick_id, kind, ordinal"
            ).bindparams(bindparam("ids", expanding=True)),
            {"ids": list(ids), "model": model},
        ).all()
        columns = [BrickLexicalRow.__table__.c[name] for name in _LEXICAL_COLUMNS]
        lexical = {
            row.brick_id: _lexical(row)
            for row in session.execute(select(*columns).where(BrickLexicalRow.brick_id.in_(list(ids))))
        }
        by_brick: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for brick_id, kind, _, raw in rows:
            vec = np.frombuffer(bytes(raw), dtype=">f4", offset=4).astype(np.float32)
            descs, examples = by_brick.setdefault(brick_id, ([], []))
            (descs if kind == "description" else examples).append(vec)
        features = {}
        for brick_id, (descs, examples) in by_brick.items():
            if descs and brick_id in lexical:
                ex_vecs = np.stack(examples) if examples else np.zeros((0, dim), np.float32)
                features[brick_id] = _features(brick_id, descs[0], ex_vecs, lexical[brick_id])
        return features


def make_index(db: Database) -> SearchIndex:
    """The index for the database's backend."""
    return PgVectorIndex(db) if db.dialect == "postgresql" else InMemoryIndex(db)
