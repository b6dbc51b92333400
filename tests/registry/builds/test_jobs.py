"""Unit tests of the build workers' scheduling (`WorkerPool`), with threads building in
place and an in-memory queue standing in for the composition store."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from registry.builds.jobs import WorkerPool
from registry.settings import Settings


@dataclass
class _Queued:
    id: str
    method: str = "linear"
    output: str = "full"


@dataclass
class _Queue:
    """The part of `CompositionStore` the pool uses: claim, fail."""

    items: list[_Queued] = field(default_factory=list)
    claims: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def claim_next(self, worker: str) -> _Queued | None:
        with self.lock:
            if not self.items:
                return None
            item = self.items.pop(0)
            self.claims.append((item.id, worker))
            return item

    def get(self, composition_id: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(status="ready", error=None, message=f"built {composition_id}")

    def fail(self, *args: Any) -> None:
        raise AssertionError("thread builds never fail through the pool")


class _Compositions:
    """The part of `Compositions` the pool uses: recover, store, build_claimed, and the
    catalog's database and the blobs (for quality checks: a real, empty SQLite database)."""

    def __init__(self, tmp_path: Path) -> None:
        from types import SimpleNamespace

        from registry.db.migrate import ensure_schema
        from registry.db.session import Database
        from registry.storage.blobs import LocalBlobStore

        db = Database.from_url(f"sqlite:///{tmp_path / 'registry.db'}")
        ensure_schema(db.engine, auto_upgrade=True)
        self.catalog = SimpleNamespace(db=db)
        self.blobs = LocalBlobStore(tmp_path / "blobs")
        self.store = _Queue()
        self.built: list[str] = []
        self.recovered = 0
        self.done = threading.Event()
        self.expected = 0

    def recover(self, alive: Any) -> list[str]:
        self.recovered += 1
        return []

    def build_claimed(self, composition: _Queued, worker: str) -> None:
        self.built.append(composition.id)
        if len(self.built) >= self.expected:
            self.done.set()


def _settings(tmp_path: Path, workers: int) -> Settings:
    return Settings(home=tmp_path, compose={"workers": workers, "isolation": "thread"})


def test_each_queued_composition_is_built_once(tmp_path: Path) -> None:
    compositions = _Compositions(tmp_path)
    compositions.expected = 20
    compositions.store.items = [_Queued(f"c{i}") for i in range(20)]
    pool = WorkerPool(compositions, _settings(tmp_path, workers=3))  # type: ignore[arg-type]
    pool.start()
    try:
        assert compositions.done.wait(10)
    finally:
        pool.stop()
    assert compositions.recovered == 1
    assert sorted(compositions.built) == sorted(f"c{i}" for i in range(20))
    assert len({worker for _, worker in compositions.store.claims}) >= 1
    assert all(not thread.is_alive() for thread in pool._threads)


def test_wake_claims_before_the_next_poll(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr("registry.builds.jobs._POLL_S", 60.0)  # only a wake can make it look again in time
    compositions = _Compositions(tmp_path)
    compositions.expected = 1
    pool = WorkerPool(compositions, _settings(tmp_path, workers=1))  # type: ignore[arg-type]
    pool.start()
    try:
        time.sleep(0.05)  # the worker found nothing and waits for a wake or the poll
        with compositions.store.lock:
            compositions.store.items.append(_Queued("late"))
        pool.wake()
        assert compositions.done.wait(10)
    finally:
        pool.stop()
    assert compositions.built == ["late"]


def test_zero_workers_build_nothing(tmp_path: Path) -> None:
    compositions = _Compositions(tmp_path)
    compositions.store.items = [_Queued("c0")]
    pool = WorkerPool(compositions, _settings(tmp_path, workers=0))  # type: ignore[arg-type]
    pool.start()
    time.sleep(0.2)
    pool.stop()
    assert compositions.built == []
    assert compositions.store.items == [_Queued("c0")]
