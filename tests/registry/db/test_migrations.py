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


def test_0005_moves_document_frequencies_into_their_table_and_back(empty_database_url: str) -> None:
    import numpy as np
    from alembic import command
    from sqlalchemy import text

    from registry.db.migrate import alembic_config

    engine = make_engine(empty_database_url)
    try:
        upgrade(engine, "0004")
        shape = np.zeros(1 << 18, "<i4")
        shape[[3, 70_000]] = [5, 1]
        word = np.zeros(1 << 18, "<i4")
        word[42] = 2
        with engine.begin() as connection:
            connection.execute(
                text("UPDATE retrieval_stats SET model = 'm', dim = 2, df_shape = :s, df_word = :w WHERE id = 1"),
                {"s": shape.tobytes(), "w": word.tobytes()},
            )
        upgrade(engine, "0005")
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT view, bucket, count FROM retrieval_df ORDER BY view, bucket")).all()
        assert [tuple(r) for r in rows] == [("shape", 3, 5), ("shape", 70_000, 1), ("word", 42, 2)]
        command.downgrade(alembic_config(engine), "0004")
        with engine.connect() as connection:
            back = connection.execute(text("SELECT df_shape, df_prefix, df_word FROM retrieval_stats")).one()
        assert bytes(back[0]) == shape.tobytes()
        assert bytes(back[1]) == np.zeros(1 << 18, "<i4").tobytes()
        assert bytes(back[2]) == word.tobytes()
    finally:
        engine.dispose()


def test_0012_backfills_folded_names_and_stops_on_names_that_differ_only_in_case(empty_database_url: str) -> None:
    from alembic import command
    from sqlalchemy import text

    from registry.db.migrate import alembic_config

    engine = make_engine(empty_database_url)
    insert = text("INSERT INTO brick_names (name, last_version, created_at) VALUES (:n, 0, CURRENT_TIMESTAMP)")
    try:
        upgrade(engine, "0011")
        with engine.begin() as connection:
            for name in ("Fine", "fine", "Other"):
                connection.execute(insert, {"n": name})
        with pytest.raises(RuntimeError) as caught:
            upgrade(engine, "0012")
        assert "brick_names: Fine, fine" in str(caught.value) and "Other" not in str(caught.value)
        assert current_revision(engine) == "0011"  # nothing changed
        with engine.begin() as connection:
            connection.execute(text("DELETE FROM brick_names WHERE name = 'fine'"))
        upgrade(engine, "0012")
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT name, name_folded FROM brick_names ORDER BY name")).all()
        assert [tuple(r) for r in rows] == [("Fine", "fine"), ("Other", "other")]
        with pytest.raises(Exception, match=r"(?i)unique"), engine.begin() as connection:
            connection.execute(
                text(
                    "INSERT INTO brick_names (name, name_folded, last_version, created_at) "
                    "VALUES ('FINE', 'fine', 0, CURRENT_TIMESTAMP)"
                )
            )
        command.downgrade(alembic_config(engine), "0011")
        with engine.connect() as connection:
            assert [r[0] for r in connection.execute(text("SELECT name FROM brick_names ORDER BY name"))] == [
                "Fine",
                "Other",
            ]
    finally:
        engine.dispose()
