"""Alembic environment. The URL comes from Brickyard's Settings (``BRICKYARD_DATABASE_URL``)
unless the caller passes an engine in ``config.attributes["engine"]``."""

from __future__ import annotations

from alembic import context

from registry.db.models import Base
from registry.db.session import make_engine
from registry.settings import Settings

config = context.config
target_metadata = Base.metadata


def _include_object(obj, name, type_, reflected, compare_to):  # type: ignore[no-untyped-def]
    # pgvector's HNSW index is an expression index Alembic cannot compare; it is owned by the migration.
    return not (type_ == "index" and name is not None and name.startswith("ix_hnsw_"))


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        engine = make_engine(Settings().sqlalchemy_url)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=target_metadata,
            compare_type=True,
            render_as_batch=connection.dialect.name == "sqlite",
            include_object=_include_object,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `brickyard db upgrade`")
run_migrations_online()
