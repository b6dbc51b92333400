"""The SQL store of compositions: a small job queue whose state machine is

```
            request            claim              finish
 (none) ──────────> queued ──────────> running ──────────> ready ──(evict, delete)──> (none)
                      ^    │ cancel        │ fail / interrupted / cancel
                      │    v               v
                      └─── cancelled / failed (request again: retry)
```

Claims are atomic (``FOR UPDATE SKIP LOCKED`` on PostgreSQL; SQLite serialises writers),
so any number of worker threads or processes can share the queue. Every method is one
transaction and returns domain objects.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite

from registry import domain
from registry.db.blob_lock import lock_blob_collection
from registry.db.models import (
    CompositionBrickRow,
    CompositionLeaseRow,
    CompositionNameRow,
    CompositionRow,
    as_utc,
    utcnow,
)
from registry.db.names import refuse_case_twin
from registry.db.queue import claim_oldest
from registry.db.session import Database
from registry.errors import ServiceUnavailable

__all__ = ["CompositionStore"]

QUEUED, RUNNING, READY, FAILED, CANCELLED = "queued", "running", "ready", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, READY, FAILED, CANCELLED)


def _changed(result: Any) -> int:
    """Rows an UPDATE changed (``rowcount`` of a DML result)."""
    return int(result.rowcount)


class CompositionStore:
    """Compositions in SQL."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, composition_id: str) -> domain.Composition | None:
        """The composition, or None."""
        with self.db.session() as session:
            row = session.get(CompositionRow, composition_id)
            return row.to_domain() if row is not None else None

    def create(
        self,
        composition_id: str,
        recipe: dict[str, Any],
        *,
        base_model_id: int,
        output: str,
        method: str,
        actor: str | None,
        blobs_present: Callable[[], bool] | None = None,
    ) -> tuple[domain.Composition, bool]:
        """Queue a composition unless it exists; a failed one is queued again. A recipe that
        names blobs of its own (a discovery's probe sets) passes ``blobs_present``: checked
        under the blob-collection lock, like `finish`.

        Returns:
            (the composition, whether this call queued it).

        Raises:
            ServiceUnavailable: ``blobs_present`` answered False (collected meanwhile).
        """
        with self.db.session(write=True) as session:
            if blobs_present is not None:
                lock_blob_collection(session)
                if not blobs_present():
                    raise ServiceUnavailable(
                        "the job's stored inputs were collected while it was queued; request again"
                    )
            insert = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
            now = utcnow()
            created = (
                session.execute(
                    insert(CompositionRow)
                    .values(
                        id=composition_id,
                        recipe=recipe,
                        base_model_id=base_model_id,
                        output=output,
                        method=method,
                        status=QUEUED,
                        progress=0.0,
                        message="queued",
                        attempts=0,
                        requested_by=actor,
                        created_at=now,
                        last_accessed_at=now,
                    )
                    .on_conflict_do_nothing()
                    .returning(CompositionRow.id)
                ).scalar()
                is not None
            )
            requeued = 0
            if created:
                for name in sorted({b["name"] for b in recipe.get("bricks", [])}):  # any recipe shape
                    session.add(CompositionBrickRow(composition_id=composition_id, brick_name=name))
            else:
                requeued = _changed(
                    session.execute(
                        update(CompositionRow)
                        .where(CompositionRow.id == composition_id, CompositionRow.status.in_((FAILED, CANCELLED)))
                        .values(status=QUEUED, progress=0.0, message="queued again", error=None, error_code=None)
                    )
                )
            row = session.get(CompositionRow, composition_id, populate_existing=True)
            assert row is not None
            row.last_accessed_at = now
            return row.to_domain(), bool(created or requeued)

    def claim_next(self, worker: str) -> domain.Composition | None:
        """Take the oldest queued composition for ``worker`` (None when the queue is empty)."""
        return claim_oldest(
            self.db,
            CompositionRow.id,
            CompositionRow.status == QUEUED,
            CompositionRow.created_at,
            lambda session, composition_id: self._start(session, composition_id, worker),
        )

    def claim(self, composition_id: str, worker: str) -> domain.Composition | None:
        """Take a specific queued composition (None if it is not queued any more)."""
        with self.db.session(write=True) as session:
            return self._start(session, composition_id, worker)

    def _start(self, session: Any, composition_id: str, worker: str) -> domain.Composition | None:
        now = utcnow()
        claimed = _changed(
            session.execute(
                update(CompositionRow)
                .where(CompositionRow.id == composition_id, CompositionRow.status == QUEUED)
                .values(
                    status=RUNNING,
                    worker=worker,
                    started_at=now,
                    heartbeat_at=now,
                    progress=0.0,
                    message="starting",
                    attempts=CompositionRow.attempts + 1,
                )
            )
        )
        if not claimed:
            return None
        row = session.get(CompositionRow, composition_id, populate_existing=True)
        return row.to_domain() if row is not None else None

    def heartbeat(self, composition_id: str, worker: str, progress: float, message: str) -> bool:
        """Record progress of a running build; False when ``worker`` no longer owns it."""
        with self.db.session(write=True) as session:
            return bool(
                _changed(
                    session.execute(
                        update(CompositionRow)
                        .where(
                            CompositionRow.id == composition_id,
                            CompositionRow.worker == worker,
                            CompositionRow.status == RUNNING,
                        )
                        .values(progress=progress, message=message[:500], heartbeat_at=utcnow())
                    )
                )
            )

    def finish(
        self,
        composition_id: str,
        worker: str,
        size_bytes: int,
        message: str,
        files: list[dict[str, Any]] | None = None,
        blobs_present: Callable[[], bool] | None = None,
    ) -> bool:
        """Mark a build ready; False when it was cancelled (or taken over) meanwhile. ``files``
        is its manifest when published to the blob store (recorded in the same transaction, so
        a ready composition always has it).

        The manifest's blobs may have been deduplicated onto old orphans: the row is written
        under the lock ``fsck --repair`` deletes under (`lock_blob_collection`), after
        ``blobs_present`` confirms the bytes are still there.

        Raises:
            ServiceUnavailable: ``blobs_present`` answered False (a concurrent ``fsck --repair``
                collected some of the bytes): nothing was recorded, publish again.
        """
        with self.db.session(write=True) as session:
            if files is not None:
                lock_blob_collection(session)
                if blobs_present is not None and not blobs_present():
                    raise ServiceUnavailable(
                        "a published file's bytes were collected while the composition was being finished"
                    )
            now = utcnow()
            return bool(
                _changed(
                    session.execute(
                        update(CompositionRow)
                        .where(
                            CompositionRow.id == composition_id,
                            CompositionRow.worker == worker,
                            CompositionRow.status == RUNNING,
                        )
                        .values(
                            status=READY,
                            progress=1.0,
                            message=message[:500],
                            size_bytes=size_bytes,
                            finished_at=now,
                            last_accessed_at=now,
                            error=None,
                            error_code=None,
                            files=files,
                        )
                    )
                )
            )

    def fail(self, composition_id: str, worker: str | None, error: str, code: str) -> bool:
        """Mark a running build failed (only ``worker``'s, when given)."""
        with self.db.session(write=True) as session:
            query = update(CompositionRow).where(CompositionRow.id == composition_id, CompositionRow.status == RUNNING)
            if worker is not None:
                query = query.where(CompositionRow.worker == worker)
            return bool(
                _changed(
                    session.execute(
                        query.values(status=FAILED, error=error[:4000], error_code=code, finished_at=utcnow())
                    )
                )
            )

    def running(self) -> list[tuple[str, str | None, datetime | None]]:
        """(id, worker, last heartbeat) of every running build."""
        with self.db.session() as session:
            rows = session.execute(
                select(CompositionRow.id, CompositionRow.worker, CompositionRow.heartbeat_at).where(
                    CompositionRow.status == RUNNING
                )
            ).all()
        return [(r.id, r.worker, r.heartbeat_at) for r in rows]

    def count_by_status(self) -> dict[str, int]:
        """How many compositions are in each status (``queued``: the build queue's length)."""
        from sqlalchemy import func

        with self.db.session() as session:
            rows = session.execute(select(CompositionRow.status, func.count()).group_by(CompositionRow.status)).all()
        return {status: int(count) for status, count in rows}

    def touch(self, composition_id: str) -> None:
        """Record a use (for LRU eviction)."""
        with self.db.session(write=True) as session:
            session.execute(
                update(CompositionRow).where(CompositionRow.id == composition_id).values(last_accessed_at=utcnow())
            )

    def ready_by_age(self) -> list[tuple[str, int]]:
        """(id, size) of ready compositions, least recently used first."""
        with self.db.session() as session:
            rows = session.execute(
                select(CompositionRow.id, CompositionRow.size_bytes)
                .where(CompositionRow.status == READY)
                .order_by(CompositionRow.last_accessed_at)
            ).all()
        return [(r.id, int(r.size_bytes or 0)) for r in rows]

    def delete_ready(self, composition_id: str) -> bool:
        """Forget a ready composition (its directory is being evicted)."""
        with self.db.session(write=True) as session:
            row = session.get(CompositionRow, composition_id)
            if row is None or row.status != READY:
                return False
            session.delete(row)
            return True

    # -- published outputs (registry.storage.composition_outputs) -----------------------------------

    def published_files(self, composition_id: str) -> list[dict[str, Any]] | None:
        """The manifest of a composition published to the blob store (None otherwise)."""
        with self.db.session() as session:
            files = session.execute(select(CompositionRow.files).where(CompositionRow.id == composition_id)).scalar()
        return list(files) if files is not None else None

    def published_digests(self) -> dict[str, list[str]]:
        """sha256 -> ids of the compositions whose published files use that blob."""
        with self.db.session() as session:
            rows = session.execute(
                select(CompositionRow.id, CompositionRow.files).where(CompositionRow.files.is_not(None))
            ).all()
        used: dict[str, list[str]] = {}
        for row in rows:
            for entry in row.files or ():
                used.setdefault(str(entry["sha256"]), []).append(row.id)
        return used

    # -- download leases (eviction leaves leased compositions alone) ---------------------

    def lease(self, composition_id: str, ttl_s: float) -> int | None:
        """Hold a ready composition for a download for ``ttl_s`` seconds; None when it is not
        ready. The composition row is locked, so an eviction either removed it before (no
        lease) or sees the lease (and keeps it)."""
        with self.db.session(write=True) as session:
            row = session.get(CompositionRow, composition_id, with_for_update=True)
            if row is None or row.status != READY:
                return None
            lease = CompositionLeaseRow(composition_id=composition_id, expires_at=utcnow() + timedelta(seconds=ttl_s))
            session.add(lease)
            session.flush()
            return int(lease.id)

    def renew_lease(self, lease_id: int, ttl_s: float) -> None:
        """Push a lease's expiry ``ttl_s`` seconds from now."""
        with self.db.session(write=True) as session:
            session.execute(
                update(CompositionLeaseRow)
                .where(CompositionLeaseRow.id == lease_id)
                .values(expires_at=utcnow() + timedelta(seconds=ttl_s))
            )

    def release_lease(self, lease_id: int) -> None:
        """Drop a lease (the download ended); expired leases of anyone go too."""
        with self.db.session(write=True) as session:
            session.execute(
                delete(CompositionLeaseRow).where(
                    (CompositionLeaseRow.id == lease_id) | (CompositionLeaseRow.expires_at < utcnow())
                )
            )

    def delete_ready_unleased(self, composition_id: str) -> bool:
        """`delete_ready`, unless an unexpired lease holds the composition (same transaction,
        the row locked as `lease` locks it)."""
        with self.db.session(write=True) as session:
            row = session.get(CompositionRow, composition_id, with_for_update=True)
            if row is None or row.status != READY:
                return False
            leased = session.scalar(
                select(
                    exists().where(
                        CompositionLeaseRow.composition_id == composition_id,
                        CompositionLeaseRow.expires_at > utcnow(),
                    )
                )
            )
            if leased:
                return False
            session.delete(row)
            return True

    # -- management: cancel, delete, list, names -------------------------------------------

    def cancel(self, composition_id: str, actor: str | None) -> bool:
        """Cancel a queued or running build (a running one stops at its next heartbeat).
        False when it was neither queued nor running."""
        with self.db.session(write=True) as session:
            return bool(
                _changed(
                    session.execute(
                        update(CompositionRow)
                        .where(CompositionRow.id == composition_id, CompositionRow.status.in_((QUEUED, RUNNING)))
                        .values(
                            status=CANCELLED,
                            message=f"cancelled by {actor or 'anonymous'}"[:500],
                            error="cancelled; request the composition again to build it",
                            error_code="cancelled",
                            finished_at=utcnow(),
                        )
                    )
                )
            )

    def delete(self, composition_id: str) -> domain.Composition | None:
        """Forget a composition that is not queued or running (cancel it first); its names
        and brick rows go with it. None when there was no such row or it is being built."""
        with self.db.session(write=True) as session:
            row = session.get(CompositionRow, composition_id)
            if row is None or row.status in (QUEUED, RUNNING):
                return None
            gone = row.to_domain()
            session.execute(delete(CompositionNameRow).where(CompositionNameRow.composition_id == composition_id))
            session.execute(delete(CompositionBrickRow).where(CompositionBrickRow.composition_id == composition_id))
            session.delete(row)
            return gone

    def list_page(
        self,
        *,
        base_model_id: int | None = None,
        brick: str | None = None,
        status: str | None = None,
        name: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[domain.Composition], str | None]:
        """A page of compositions, newest first, and the cursor of the next page (keyset
        pagination on (created_at, id): stable while rows are added)."""
        query = select(CompositionRow)
        if base_model_id is not None:
            query = query.where(CompositionRow.base_model_id == base_model_id)
        if status is not None:
            query = query.where(CompositionRow.status == status)
        if brick is not None:
            query = query.where(
                CompositionRow.id.in_(
                    select(CompositionBrickRow.composition_id).where(CompositionBrickRow.brick_name == brick)
                )
            )
        if name is not None:
            query = query.where(
                CompositionRow.id.in_(select(CompositionNameRow.composition_id).where(CompositionNameRow.name == name))
            )
        if cursor is not None:
            created, last_id = _decode_cursor(cursor)
            query = query.where(
                or_(
                    CompositionRow.created_at < created,
                    (CompositionRow.created_at == created) & (CompositionRow.id < last_id),
                )
            )
        query = query.order_by(CompositionRow.created_at.desc(), CompositionRow.id.desc()).limit(limit + 1)
        with self.db.session() as session:
            rows = session.scalars(query).all()
            items = [r.to_domain() for r in rows[:limit]]
            raw_last = rows[limit - 1].created_at if len(rows) > limit else None
        next_cursor = _encode_cursor(raw_last, items[-1].id) if raw_last is not None else None
        return items, next_cursor

    def set_name(self, name: str, composition_id: str, actor: str | None) -> None:
        """Point ``name`` at a composition (moving it if it pointed elsewhere)."""
        with self.db.session(write=True) as session:
            row = session.get(CompositionNameRow, name)
            if row is None:
                refuse_case_twin(
                    session, CompositionNameRow.name, CompositionNameRow.name_folded, name, what="composition name"
                )
                session.add(CompositionNameRow(name=name, composition_id=composition_id, created_by=actor))
            else:
                row.composition_id, row.created_by, row.created_at = composition_id, actor, utcnow()

    def remove_name(self, name: str) -> str | None:
        """Remove a name; the id it pointed at, or None."""
        with self.db.session(write=True) as session:
            row = session.get(CompositionNameRow, name)
            if row is None:
                return None
            session.delete(row)
            return row.composition_id

    def resolve_name(self, name: str) -> str | None:
        """The composition id a name points at, or None."""
        with self.db.session() as session:
            return session.scalar(select(CompositionNameRow.composition_id).where(CompositionNameRow.name == name))

    def names_of(self, composition_ids: list[str]) -> dict[str, list[str]]:
        """The names pointing at each of these compositions (sorted)."""
        if not composition_ids:
            return {}
        with self.db.session() as session:
            rows = session.execute(
                select(CompositionNameRow.composition_id, CompositionNameRow.name)
                .where(CompositionNameRow.composition_id.in_(composition_ids))
                .order_by(CompositionNameRow.name)
            ).all()
        found: dict[str, list[str]] = {}
        for composition_id, name in rows:
            found.setdefault(composition_id, []).append(name)
        return found


def _encode_cursor(created: datetime, composition_id: str) -> str:
    stamp = as_utc(created).isoformat()
    return base64.urlsafe_b64encode(json.dumps([stamp, composition_id]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    from registry.errors import InvalidInput

    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        stamp, composition_id = json.loads(raw)
        if isinstance(stamp, str) and isinstance(composition_id, str):
            return datetime.fromisoformat(stamp), composition_id
    except (binascii.Error, ValueError, TypeError):
        pass
    raise InvalidInput("invalid cursor", errors=["cursor: pass the next_cursor of a previous page unchanged"])
