"""The in-memory index (the SQLite backend's candidate generation), on both databases: exact
nearest vectors, filters, and a snapshot that follows writes. Vectors are hand-made unit vectors,
so the expected neighbours and cosines are known without an embedding model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from registry.db.session import Database
from registry.search.index import InMemoryIndex, SearchFilters
from registry.search.index_rows import EmbeddedTexts
from registry.storage.store import Store
from tests.registry.storage.test_store import base_draft, brick_draft

DIM = 4


def unit(*values: float) -> np.ndarray:
    v = np.array(values, np.float32)
    return v / np.linalg.norm(v)


def embedded(desc: np.ndarray, examples: list[np.ndarray]) -> EmbeddedTexts:
    texts = tuple(f"example {i}" for i in range(len(examples)))
    ex = np.stack(examples) if examples else np.zeros((0, DIM), np.float32)
    return EmbeddedTexts("test-model", "a description", texts, desc, ex, ex.copy())


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    db = Database.from_url(database_url)
    store = Store(db)
    store.add_base_model(base_draft("base"))
    store.add_base_model(base_draft("other"))
    yield store
    db.dispose()


def add(store: Store, name: str, desc: np.ndarray, examples: list[np.ndarray], **extra: Any) -> None:
    store.add_brick(
        brick_draft(
            name,
            f"{name}-{extra.get('version', 0)}-{desc.tobytes().hex()}",
            examples=tuple(f"example {i}" for i in range(len(examples))),
            **extra,
        ),
        embedded=embedded(desc, examples),
    )


def owners(found: Any) -> list[list[float]]:
    """The candidates, named by their description vectors (rounded)."""
    return [np.round(f.desc_vec, 3).tolist() for f in found.features]


def search(index: InMemoryIndex, query: np.ndarray, filters: SearchFilters | None = None, **kw: Any) -> Any:
    options = {"n": 10, "max_bricks": 10, **kw}
    return index.candidates(query, model="test-model", filters=filters or SearchFilters(), **options)


def test_candidates_are_the_owners_of_the_nearest_vectors_best_first(store: Store) -> None:
    add(store, "a", unit(1, 0, 0, 0), [unit(0, 0, 1, 0)])
    add(store, "b", unit(0, 1, 0, 0), [unit(0, 0, 0, 1)])
    index = InMemoryIndex(store.db)
    found = search(index, unit(0.2, 0, 0, 1))  # nearest: b's example, then a's description
    assert owners(found) == [np.round(unit(0, 1, 0, 0), 3).tolist(), np.round(unit(1, 0, 0, 0), 3).tolist()]
    assert found.max_example_sim == pytest.approx(float(unit(0.2, 0, 0, 1) @ unit(0, 0, 0, 1)), rel=1e-5)
    assert found.stats.example_count == 2
    only_one = search(index, unit(0.2, 0, 0, 1), max_bricks=1)
    assert len(only_one.features) == 1


def test_without_an_example_among_the_hits_max_example_sim_is_the_last_hits_cosine(store: Store) -> None:
    add(store, "a", unit(1, 0, 0, 0), [unit(0, 0, 1, 0)])
    query = unit(1, 0, 0.5, 0)  # description cosine 2/sqrt(5), example cosine 1/sqrt(5)
    found = search(InMemoryIndex(store.db), query, n=1)  # only the description is a hit
    assert len(found.features) == 1
    # Every example is below the last hit: its cosine bounds the best example similarity.
    assert found.max_example_sim == pytest.approx(2 / 5**0.5, rel=1e-5)
    both = search(InMemoryIndex(store.db), query, n=2)
    assert both.max_example_sim == pytest.approx(1 / 5**0.5, rel=1e-5)


def test_filters_by_base_model_tag_and_latest_version(store: Store) -> None:
    add(store, "a", unit(1, 0, 0, 0), [], tags=("nlp",))
    add(store, "b", unit(0, 1, 0, 0), [], base_model="other", tags=("nlp",))
    add(store, "c", unit(0, 0, 1, 0), [], tags=("vision",), version=1)
    add(store, "c", unit(0, 0, 0, 1), [], tags=("vision",), version=2)
    index = InMemoryIndex(store.db)
    query = unit(1, 1, 1, 1)
    assert len(search(index, query).features) == 3  # a, b, c@2
    other = search(index, query, SearchFilters(base_model_ids=(store.base_model_id("other"),)))
    assert owners(other) == [np.round(unit(0, 1, 0, 0), 3).tolist()]
    # Several base models (one and its fingerprint twins): the bricks of each of them.
    both = (store.base_model_id("other"), store.base_model_id("base"))
    assert len(search(index, query, SearchFilters(base_model_ids=both)).features) == 3
    assert search(index, query, SearchFilters(base_model_ids=())).features == []
    vision = search(index, query, SearchFilters(tags=("vision",)))
    assert owners(vision) == [np.round(unit(0, 0, 0, 1), 3).tolist()]  # the latest version only
    every = search(index, query, SearchFilters(tags=("vision",), all_versions=True))
    assert sorted(owners(every)) == sorted(
        [np.round(unit(0, 0, 1, 0), 3).tolist(), np.round(unit(0, 0, 0, 1), 3).tolist()]
    )
    nothing = search(index, query, SearchFilters(tags=("audio",)))
    assert nothing.features == [] and nothing.max_example_sim == -1.0


def test_the_snapshot_follows_registrations_and_deletions(store: Store) -> None:
    add(store, "a", unit(1, 0, 0, 0), [])
    index = InMemoryIndex(store.db)
    first = search(index, unit(0, 1, 0, 0))
    assert len(first.features) == 1
    add(store, "b", unit(0, 1, 0, 0), [])
    second = search(index, unit(0, 1, 0, 0))
    assert owners(second)[0] == np.round(unit(0, 1, 0, 0), 3).tolist()
    assert second.generation > first.generation
    store.delete_brick("b", 1)
    third = search(index, unit(0, 1, 0, 0))
    assert owners(third) == [np.round(unit(1, 0, 0, 0), 3).tolist()]
