"""Alembic owns the schema: it upgrades an empty database on both backends, and the
SQLAlchemy models and the migrations describe the same schema."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from registry.db.migrate import current_revision, ensure_schema, head_revision, include_object, upgrade
from registry.db.models import Base
from registry.db.session import make_engine
from registry.errors import SchemaOutOfDate
from registry.service import Registry
from registry.settings import Settings


def test_upgrade_head_on_an_empty_database(empty_database_url: str) -> None:
    engine = make_engine(empty_database_url)
    try:
        assert current_revision(engine) is None
        upgrade(engine)
        assert current_revision(engine) == head_revision()
        upgrade(engine)  # idempotent
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_models_and_migrations_do_not_drift(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "include_object": include_object}
            )
            diff = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_service_refuses_an_out_of_date_schema(empty_database_url: str, tmp_path: Any) -> None:
    settings = Settings(home=tmp_path / "home", database_url=empty_database_url)
    with pytest.raises(SchemaOutOfDate) as caught:
        Registry.open(settings)
    assert "brickyard db upgrade" in str(caught.value)


def test_embedded_sqlite_upgrades_itself(tmp_path: Any) -> None:
    settings = Settings(home=tmp_path / "home")
    assert settings.is_embedded_sqlite
    registry = Registry.open(settings)
    try:
        assert current_revision(registry.store.db.engine) == head_revision()
        assert (tmp_path / "home" / "brickyard.db").exists()
    finally:
        registry.close()


def test_ensure_schema_passes_at_head(database_url: str) -> None:
    engine = make_engine(database_url)
    try:
        ensure_schema(engine, auto_upgrade=False)
    finally:
        engine.dispose()
