"""Claiming the oldest queued row of a work queue kept in a table (compositions, quality checks).

Workers poll; most polls find nothing. So a claim first makes a cheap read (no write lock:
on SQLite a write transaction serialises every writer), and only when something is queued
opens a write transaction that picks the oldest row, skipping rows other workers have
locked on PostgreSQL (``FOR UPDATE SKIP LOCKED``), and hands it to ``start``, which marks it
taken (its conditional UPDATE is what makes the claim exclusive on SQLite).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import select

if TYPE_CHECKING:
    from registry.db.session import Database

__all__ = ["claim_oldest"]

T = TypeVar("T")


def claim_oldest(
    db: Database, id_column: Any, queued: Any, order: Any, start: Callable[[Any, Any], T | None]
) -> T | None:
    """Claim the oldest queued row: ``start(session, id)`` in the write transaction, or None
    when nothing is queued (or another worker took it first).

    Args:
        db: the database of the queue.
        id_column: the column selected and handed to ``start`` (e.g. ``CompositionRow.id``).
        queued: the condition of a queued row (e.g. ``CompositionRow.status == "queued"``).
        order: what "oldest" sorts by (e.g. ``CompositionRow.created_at``).
        start: marks the row taken; returns what the claim returns, or None if the row was taken.
    """
    with db.session() as session:  # a cheap read first: polling must not take the write lock
        if session.scalar(select(id_column).where(queued).limit(1)) is None:
            return None
    with db.session(write=True) as session:
        query = select(id_column).where(queued).order_by(order)
        if db.dialect == "postgresql":
            query = query.with_for_update(skip_locked=True)
        row_id = session.scalar(query.limit(1))
        if row_id is None:
            return None
        return start(session, row_id)
