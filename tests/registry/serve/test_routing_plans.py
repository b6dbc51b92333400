"""The router's plan cache (`registry.serve.routing._Plans`) and the embedded engine's thread
default: pure parts, no server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from registry.serve import routing
from registry.serve.embedded import engine_threads
from registry.serve.routing import _Bricks, _Plan, _Plans


def _plan(directory: Path, checked_at: float, *, local: bool = True) -> _Plan:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "brickyard.json").write_text("{}")
    return _Plan("c" * 64, directory, (("french", 1, 1.0),), checked_at, local)


@pytest.fixture(autouse=True)
def _no_expiry_by_age(monkeypatch: pytest.MonkeyPatch) -> None:
    """Plans do not age out while a test runs, however slow the host (the test of ageing sets its own clock)."""
    monkeypatch.setattr(routing, "_PLAN_RECHECK_S", 1e9)


def test_a_plan_is_answered_until_its_directory_goes(tmp_path: Path) -> None:
    plans = _Plans()
    plan = _plan(tmp_path / "c", routing.time.monotonic())
    plans.put("k", plan)
    assert plans.get("k") == plan
    (tmp_path / "c" / "brickyard.json").unlink()  # evicted
    assert plans.get("k") is None
    (tmp_path / "c" / "brickyard.json").write_text("{}")
    assert plans.get("k") is None  # forgotten: the next request verifies through the compositions


def test_a_published_plan_needs_no_local_directory(tmp_path: Path) -> None:
    plans = _Plans()
    plan = _Plan("d" * 64, tmp_path / "absent", (), routing.time.monotonic(), False)
    plans.put("k", plan)
    assert plans.get("k") == plan


def test_a_plan_is_verified_again_after_the_recheck_interval(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(routing, "_PLAN_RECHECK_S", 30.0)
    monkeypatch.setattr(routing.time, "monotonic", lambda: now[0])
    plans = _Plans()
    plans.put("k", _plan(tmp_path / "c", now[0]))
    now[0] += routing._PLAN_RECHECK_S - 1
    assert plans.get("k") is not None
    now[0] += 2
    assert plans.get("k") is None


def test_plans_are_bounded_least_recently_used_first(tmp_path: Path) -> None:
    plans = _Plans(entries=2)
    for key in "abc":
        plans.put(key, _plan(tmp_path / key, routing.time.monotonic()))
        if key == "b":
            assert plans.get("a") is not None  # a is now more recent than b
    assert plans.get("b") is None and plans.get("a") is not None and plans.get("c") is not None
    plans.clear()
    assert plans.get("a") is None


@pytest.mark.parametrize(("cores", "expected"), [({0}, 1), ({0, 1}, 1), (set(range(8)), 7)])
def test_engine_threads_leave_a_core_to_the_server(
    cores: set[int], expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("registry.serve.embedded.os.sched_getaffinity", lambda pid: cores, raising=False)
    assert engine_threads(None) == expected
    assert engine_threads(3) == 3


def test_a_remembered_brick_is_answered_only_at_its_generation() -> None:
    bricks = _Bricks()
    entry: Any = ("brick", "base")  # the cache only keeps them
    bricks.put(("french", 1), entry, 7)
    assert bricks.get(("french", 1), 7) == entry
    assert bricks.get(("french", 2), 7) is None
    assert bricks.get(("french", 1), 8) is None  # a brick was registered, changed or deleted
    bricks.put(("legal", 1), entry, 8)  # read at the new generation: the older entries go
    assert bricks.get(("french", 1), 7) is None and bricks.get(("legal", 1), 8) == entry
    bricks.clear()  # a deletion through the gateway
    assert bricks.get(("legal", 1), 8) is None


def test_remembered_bricks_are_bounded() -> None:
    bricks = _Bricks(entries=2)
    for version in (1, 2, 3):
        bricks.put(("french", version), ("brick", version), 1)  # type: ignore[arg-type]
    assert bricks.get(("french", 3), 1) == ("brick", 3)
    assert sum(bricks.get(("french", v), 1) is not None for v in (1, 2, 3)) <= 2
