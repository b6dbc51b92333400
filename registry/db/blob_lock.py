"""The lock that serialises recording a reference to a blob with deleting an unreferenced
one (``brickyard fsck --repair``), and the check of every kind of reference, so that the
deletion's re-check and the writers agree on what "referenced" means."""

from __future__ import annotations

from sqlalchemy import ColumnElement, Text, cast, exists, select, text
from sqlalchemy.orm import Session

from registry.db.models import BrickRow, CompositionRow

__all__ = ["blob_referenced", "lock_blob_collection"]

# pg_advisory_xact_lock key shared by every writer of blob references and by blob collection
# ("brick" in ASCII).
_BLOB_LOCK_KEY = 0x627269636B


def lock_blob_collection(session: Session, *, exclusive: bool = False) -> None:
    """Serialise rows that reference blobs being recorded with unreferenced blobs being
    deleted. SQLite's write transactions (BEGIN IMMEDIATE) are serialised already;
    PostgreSQL takes a transaction-scoped advisory lock, shared by writers (which then do
    not wait for each other) and exclusive for a deletion."""
    if session.get_bind().dialect.name == "postgresql":
        function = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
        session.execute(text(f"SELECT {function}(:key)"), {"key": _BLOB_LOCK_KEY})


def _mentions(column: ColumnElement[object], digest: str) -> ColumnElement[bool]:
    # A 64-hex digest inside the JSON text: a manifest entry's sha256 or a job's probe set.
    # Conservative (any mention keeps the blob), and the same SQL on SQLite and PostgreSQL.
    return cast(column, Text).contains(digest, autoescape=True)


def blob_referenced(session: Session, digest: str) -> bool:
    """Whether any row references the blob ``digest``: a brick's weights or config, a
    published composition's file (``compositions.files``), or a job's recipe (an emergent
    discovery's probe sets, ``recipe.probes_sha256``)."""
    brick = exists().where((BrickRow.sha256 == digest) | (BrickRow.config_sha256 == digest))
    composition = exists().where(
        _mentions(CompositionRow.files, digest) | _mentions(CompositionRow.recipe, digest)  # type: ignore[arg-type]
    )
    return bool(session.scalar(select(brick | composition)))
