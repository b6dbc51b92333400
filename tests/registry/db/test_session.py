"""The managed session: commit, rollback, and database failures as domain errors."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select, text

from registry.db.models import BrickNameRow
from registry.db.session import Database
from registry.errors import Conflict, ServiceUnavailable


def test_commit_on_success_and_rollback_on_error(database_url: str) -> None:
    db = Database.from_url(database_url)
    try:
        with db.session(write=True) as session:
            session.add(BrickNameRow(name="kept", last_version=0))
        with pytest.raises(RuntimeError), db.session(write=True) as session:
            session.add(BrickNameRow(name="rolled-back", last_version=0))
            session.flush()
            raise RuntimeError("boom")
        with db.session() as session:
            names = session.scalars(select(BrickNameRow.name)).all()
        assert names == ["kept"]
    finally:
        db.dispose()


def test_integrity_error_becomes_conflict(database_url: str) -> None:
    db = Database.from_url(database_url)
    try:
        with db.session(write=True) as session:
            session.add(BrickNameRow(name="dup", last_version=0))
        with pytest.raises(Conflict), db.session(write=True) as session:
            session.add(BrickNameRow(name="dup", last_version=0))
        with db.session() as session:
            assert session.scalar(select(func.count()).select_from(BrickNameRow)) == 1
    finally:
        db.dispose()


def test_unreachable_database_is_service_unavailable(tmp_path: Any) -> None:
    db = Database.from_url("postgresql+psycopg://nobody@127.0.0.1:9/nothing?connect_timeout=1")
    try:
        with pytest.raises(ServiceUnavailable), db.session() as session:
            session.execute(text("SELECT 1"))
    finally:
        db.dispose()


def test_change_marker_moves_only_when_another_connection_commits(database_url: str) -> None:
    db, other = Database.from_url(database_url), Database.from_url(database_url)
    try:
        first = db.change_marker()
        if db.dialect == "postgresql":
            assert first is None  # no such counter: callers read what they need instead
            return
        assert first is not None
        with db.session() as session:  # reads commit nothing
            session.scalars(select(BrickNameRow.name)).all()
        assert db.change_marker() == first
        with other.session(write=True) as session:  # another pool, as another process would be
            session.add(BrickNameRow(name="elsewhere", last_version=0))
        second = db.change_marker()
        assert second != first
        assert db.change_marker() == second
        with db.session(write=True) as session:  # this database's own pooled connections count too
            session.add(BrickNameRow(name="here", last_version=0))
        assert db.change_marker() != second
    finally:
        db.dispose()
        other.dispose()
