"""The cache of bricks shown by searches, on both backends: reused without a query while
nothing was written, re-validated by ``updated_at`` after a write, never stale."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from registry import domain
from registry.db.models import BrickRow
from registry.db.session import Database
from registry.search.hit_cache import BrickCache
from registry.search.index_rows import read_generation
from registry.storage.store import Store
from tests.registry.storage.test_store import base_draft, brick_draft


class SpyStore(Store):
    """A real store that records which ids each read asked for."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.calls: list[tuple[str, list[int]]] = []

    def get_bricks_by_ids(self, ids: list[int]) -> dict[int, domain.Brick]:
        self.calls.append(("bricks", sorted(ids)))
        return super().get_bricks_by_ids(ids)

    def brick_stamps(self, ids: list[int]) -> dict[int, Any]:
        self.calls.append(("stamps", sorted(ids)))
        return super().brick_stamps(ids)


@pytest.fixture
def store(database_url: str) -> Iterator[SpyStore]:
    db = Database.from_url(database_url)
    spy = SpyStore(db)
    spy.add_base_model(base_draft())
    for name in ("a", "b", "c"):
        spy.add_brick(brick_draft(name, name))
    yield spy
    db.dispose()


def _ids(store: Store) -> dict[str, int]:
    with store.db.session() as session:
        return {name: brick_id for name, brick_id in session.execute(select(BrickRow.name, BrickRow.id))}


def _generation(store: Store) -> int:
    with store.db.session() as session:
        return read_generation(session)


def test_bricks_are_reused_without_a_query_until_something_is_written(store: SpyStore) -> None:
    ids = _ids(store)
    cache = BrickCache(store)
    generation = _generation(store)
    first = cache.get([ids["a"], ids["b"]], generation)
    assert first == {ids["a"]: store.get_brick("a"), ids["b"]: store.get_brick("b")}
    assert store.calls == [("bricks", sorted([ids["a"], ids["b"]]))]
    store.calls.clear()
    again = cache.get([ids["b"], ids["a"]], generation)
    assert again == first and store.calls == []
    # Only the brick not seen yet is read.
    cache.get([ids["a"], ids["c"]], generation)
    assert store.calls == [("bricks", [ids["c"]])]


def test_after_a_write_unchanged_bricks_are_confirmed_and_changed_ones_read_again(store: SpyStore) -> None:
    ids = _ids(store)
    cache = BrickCache(store)
    cache.get([ids["a"], ids["b"], ids["c"]], _generation(store))
    store.update_brick("a", 1, domain.BrickPatch(tags=("fresh",)))
    store.delete_brick("c", 1)
    generation = _generation(store)
    store.calls.clear()
    found = cache.get([ids["a"], ids["b"], ids["c"]], generation)
    assert found[ids["a"]].tags == ("fresh",) and found[ids["a"]] == store.get_brick("a")
    assert found[ids["b"]] == store.get_brick("b")
    assert ids["c"] not in found
    # One small query checks the three; only the patched brick is read again, and the
    # deleted one is known gone without another query.
    assert store.calls == [("stamps", sorted(ids.values())), ("bricks", [ids["a"]])]
    store.calls.clear()
    assert cache.get([ids["a"], ids["b"]], generation) == {k: found[k] for k in (ids["a"], ids["b"])}
    assert store.calls == []


def test_an_unknown_generation_always_reads_and_the_size_is_bounded(store: SpyStore) -> None:
    ids = _ids(store)
    cache = BrickCache(store, size=2)
    cache.get([ids["a"]], -1)
    cache.get([ids["a"]], -1)
    assert store.calls == [("bricks", [ids["a"]])] * 2
    store.calls.clear()
    generation = _generation(store)
    cache.get([ids["a"]], generation)
    cache.get([ids["b"]], generation)
    cache.get([ids["a"]], generation)  # a is now the most recently used
    cache.get([ids["c"]], generation)  # evicts b
    store.calls.clear()
    cache.get([ids["a"], ids["b"], ids["c"]], generation)
    assert store.calls == [("bricks", [ids["b"]])]


def test_a_generation_going_back_empties_the_cache(store: SpyStore) -> None:
    # A database replaced under a running process restarts its counter: an entry checked
    # at a higher generation must not pass for current when the new counter reaches it.
    ids = _ids(store)
    cache = BrickCache(store)
    generation = _generation(store)
    cache.get([ids["a"]], generation + 5)
    cache.get([ids["b"]], generation)
    store.calls.clear()
    cache.get([ids["b"]], generation + 1)  # the new counter moving on empties nothing more
    assert store.calls == [("stamps", [ids["b"]])]
    store.calls.clear()
    cache.get([ids["a"], ids["b"]], generation + 5)
    assert store.calls == [("stamps", [ids["b"]]), ("bricks", [ids["a"]])]
