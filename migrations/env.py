"""Alembic environment. The URL comes from Brickyard's Settings (``BRICKYARD_DATABASE_URL``)
unless the caller passes an engine in ``config.attributes["engine"]``."""

from __future__ import annotations

from alembic import context

from registry.db.migrate import include_object
from registry.db.models import Base
from registry.db.session import make_engine
from registry.settings import Settings

config = context.config
target_metadata = Base.metadata


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
            include_object=include_object,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run `brickyard db upgrade`")
run_migrations_online()
