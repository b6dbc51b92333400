"""The audit log, written inside the transaction of the change it records."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from registry.db.models import EventRow, as_utc, utcnow

__all__ = ["Event", "list_events", "record_event"]


def record_event(session: Session, actor: str | None, action: str, subject: str, details: dict[str, Any]) -> None:
    """Append an event (``action`` like ``brick.register``; ``subject`` like ``brick:name@3``)."""
    session.add(EventRow(at=utcnow(), actor=actor, action=action, subject=subject[:200], details=details))


class Event:
    """An audit event."""

    __slots__ = ("action", "actor", "at", "details", "subject")

    def __init__(self, row: EventRow) -> None:
        self.at = as_utc(row.at)
        self.actor = row.actor
        self.action = row.action
        self.subject = row.subject
        self.details = dict(row.details or {})


def list_events(session: Session, *, subject_prefix: str | None = None, limit: int = 200) -> list[Event]:
    """Events, newest first, optionally for subjects starting with ``subject_prefix``."""
    query = select(EventRow).order_by(EventRow.id.desc()).limit(limit)
    if subject_prefix is not None:
        query = query.where(EventRow.subject.startswith(subject_prefix, autoescape=True))
    return [Event(row) for row in session.scalars(query)]
