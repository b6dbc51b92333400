"""Schema management through Alembic: upgrade, and the check run on start-up.

The schema is never created with ``create_all``: Alembic owns it, from ``migrations/``.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine

from registry.errors import SchemaOutOfDate

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "current_revision",
    "ensure_schema",
    "head_revision",
    "include_object",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def include_object(obj: object, name: str | None, type_: str, reflected: bool, compare_to: object) -> bool:
    """Alembic filter: the pgvector HNSW indexes are expression indexes owned by the
    migrations, which autogenerate cannot compare; leave them out of comparisons."""
    return not (type_ == "index" and name is not None and name.startswith("ix_hnsw_"))


def alembic_config(engine: Engine | None = None):  # type: ignore[no-untyped-def]
    """An Alembic `Config` pointing at ``migrations/``; with ``engine``, bound to it."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def head_revision() -> str | None:
    """The newest revision in ``migrations/versions``."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at (None for an empty database)."""
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` on ``engine``."""
    from alembic import command

    command.upgrade(alembic_config(engine), revision)


def ensure_schema(engine: Engine, *, auto_upgrade: bool) -> None:
    """Check the schema is at head; upgrade it when ``auto_upgrade`` (embedded SQLite).

    Raises:
        SchemaOutOfDate: the schema is behind and may not be upgraded automatically.
    """
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return
    if auto_upgrade:
        upgrade(engine)
        return
    raise SchemaOutOfDate(
        f"the database schema is at revision {current or 'none (empty database)'}, this code needs {head}; "
        "run `brickyard db upgrade` (with the same BRICKYARD_DATABASE_URL)",
        extra={"current": current, "head": head},
    )
