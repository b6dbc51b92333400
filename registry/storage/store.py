"""The SQL store: base models and bricks. Every method is one transaction and returns
domain objects, never ORM rows."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Select, and_, exists, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from registry import domain
from registry.db.blob_lock import blob_referenced, lock_blob_collection
from registry.db.events import Event, list_events, record_event
from registry.db.models import BaseModelRow, BrickNameRow, BrickRow, BrickTagRow, CompositionRow, as_utc, utcnow
from registry.db.names import refuse_case_twin
from registry.db.session import Database
from registry.errors import (
    BaseModelExists,
    BaseModelInUse,
    BaseModelNotFound,
    BrickExists,
    BrickNotFound,
    Conflict,
    InvalidInput,
    NameTaken,
    ServiceUnavailable,
    VersionExists,
)
from registry.search.index_rows import (
    EmbeddedTexts,
    bump_generation,
    check_index_model,
    read_generation,
    read_index_model,
    rebuild_index,
    remove_brick_index,
    write_brick_index,
)

__all__ = ["Store"]


class Store:
    """Metadata of base models and bricks in SQL (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._generation_seen: tuple[int, int] | None = None  # (change marker, brick generation)

    # -- base models -------------------------------------------------------------------

    def add_base_model(self, draft: domain.BaseModelDraft, *, actor: str | None = None) -> domain.BaseModel:
        """Record a base model.

        Raises:
            BaseModelExists: the name is taken.
        """
        row = BaseModelRow.from_draft(draft, created_by=actor)
        try:
            with self.db.session(write=True) as session:
                refuse_case_twin(session, BaseModelRow.name, BaseModelRow.name_folded, draft.name, what="base model")
                session.add(row)
                session.flush()
                record_event(session, actor, "base_model.register", f"base_model:{draft.name}", {"path": draft.path})
                return row.to_domain()
        except Conflict as exc:
            if self._base_model_row_exists(draft.name):
                raise BaseModelExists(
                    f"a base model named {draft.name!r} is already registered", extra={"name": draft.name}
                ) from exc
            raise

    def _base_model_row_exists(self, name: str) -> bool:
        with self.db.session() as session:
            return session.scalar(select(exists().where(BaseModelRow.name == name))) or False

    def get_base_model(self, name: str) -> domain.BaseModel:
        """The base model called ``name``.

        Raises:
            BaseModelNotFound: no such base model.
        """
        with self.db.session() as session:
            row = session.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
            if row is None:
                raise BaseModelNotFound(f"no base model named {name!r} is registered", extra={"name": name})
            return row.to_domain()

    def brick_generation(self) -> int:
        """A counter every brick write (register, metadata change, delete) raises, in any
        process: a copy of a brick read at this generation is current while it stays.

        Read on every served request of a pinned brick: while the database's change marker
        stays (`Database.change_marker`, no commit anywhere) the last value is still current.
        """
        marker = self.db.change_marker()
        seen = self._generation_seen
        if marker is not None and seen is not None and seen[0] == marker:
            return seen[1]
        with self.db.session() as session:
            generation = read_generation(session)  # read after the marker: at least as new
        if marker is not None:
            self._generation_seen = (marker, generation)
        return generation

    def base_model_id(self, name: str) -> int:
        """The row id of base model ``name`` (`BaseModelNotFound` otherwise)."""
        with self.db.session() as session:
            found = session.scalar(select(BaseModelRow.id).where(BaseModelRow.name == name))
        if found is None:
            raise BaseModelNotFound(f"no base model named {name!r} is registered", extra={"name": name})
        return found

    def compatible_base_model_ids(self, name: str) -> tuple[int, ...]:
        """Row ids of base model ``name`` and every base model with its fingerprint (a brick
        of any of them fits each of them), in id order.

        Raises:
            BaseModelNotFound: no such base model.
        """
        with self.db.session() as session:
            fingerprint = select(BaseModelRow.fingerprint).where(BaseModelRow.name == name).scalar_subquery()
            found = tuple(
                session.scalars(
                    select(BaseModelRow.id).where(BaseModelRow.fingerprint == fingerprint).order_by(BaseModelRow.id)
                )
            )
        if not found:
            raise BaseModelNotFound(f"no base model named {name!r} is registered", extra={"name": name})
        return found

    def brick_names(self) -> list[str]:
        """The names of every brick with at least one version (for did-you-mean hints)."""
        with self.db.session() as session:
            return list(session.scalars(select(BrickRow.name).distinct().order_by(BrickRow.name)))

    def list_base_models(self) -> list[domain.BaseModel]:
        """Every base model, by name."""
        with self.db.session() as session:
            return [r.to_domain() for r in session.scalars(select(BaseModelRow).order_by(BaseModelRow.name))]

    def change_base_model_aliases(
        self, name: str, change: Callable[[tuple[str, ...]], tuple[str, ...]], *, actor: str | None, action: str
    ) -> domain.BaseModel:
        """Replace base model ``name``'s aliases with ``change(aliases)`` (the row is locked,
        so concurrent changes do not lose each other) and record ``action`` as an event.

        Raises:
            BaseModelNotFound: no such base model. Whatever ``change`` raises.
        """
        with self.db.session(write=True) as session:
            row = session.scalar(select(BaseModelRow).where(BaseModelRow.name == name).with_for_update())
            if row is None:
                raise BaseModelNotFound(f"no base model named {name!r} is registered", extra={"name": name})
            before = tuple(row.aliases or ())
            after = change(before)
            if after != before:
                row.aliases = list(after)
                record_event(session, actor, action, f"base_model:{name}", {"aliases": list(after)})
            session.flush()
            return row.to_domain()

    def delete_base_model(self, name: str, *, actor: str | None = None) -> domain.BaseModel:
        """Delete base model ``name`` unless bricks or compositions reference it.

        Raises:
            BaseModelNotFound: no such base model.
            BaseModelInUse: naming (up to 20 of) the bricks and compositions that use it.
        """
        with self.db.session(write=True) as session:
            row = session.scalar(select(BaseModelRow).where(BaseModelRow.name == name).with_for_update())
            if row is None:
                raise BaseModelNotFound(f"no base model named {name!r} is registered", extra={"name": name})
            bricks = session.execute(
                select(BrickRow.name, BrickRow.version)
                .where(BrickRow.base_model_id == row.id)
                .order_by(BrickRow.name, BrickRow.version)
                .limit(_IN_USE_SHOWN + 1)
            ).all()
            compositions = session.scalars(
                select(CompositionRow.id)
                .where(CompositionRow.base_model_id == row.id)
                .order_by(CompositionRow.id)
                .limit(_IN_USE_SHOWN + 1)
            ).all()
            if bricks or compositions:
                users = [f"brick {b}@{v}" for b, v in bricks[:_IN_USE_SHOWN]]
                users += [f"composition {c}" for c in compositions[:_IN_USE_SHOWN]]
                more = len(bricks) > _IN_USE_SHOWN or len(compositions) > _IN_USE_SHOWN
                raise BaseModelInUse(
                    f"base model {name!r} is used by {_at_least(len(bricks))} bricks and "
                    f"{_at_least(len(compositions))} compositions; delete them first",
                    errors=users + (["(more not shown)"] if more else []),
                    extra={"name": name},
                )
            base = row.to_domain()
            session.delete(row)
            record_event(session, actor, "base_model.delete", f"base_model:{name}", {"path": base.path})
            return base

    # -- bricks ------------------------------------------------------------------------

    def find_brick_by_sha256(self, sha256: str, config_sha256: str) -> domain.Brick | None:
        """The brick with these weights and this config (by sha256), if any."""
        with self.db.session() as session:
            row = session.scalar(
                select(BrickRow).where(BrickRow.sha256 == sha256, BrickRow.config_sha256 == config_sha256)
            )
            return row.to_domain() if row is not None else None

    def ensure_new_brick(self, sha256: str, config_sha256: str) -> None:
        """Raise `BrickExists`, naming the brick, when these weights are registered with this
        same config (the same weights with another config are another brick)."""
        existing = self.find_brick_by_sha256(sha256, config_sha256)
        if existing is not None:
            raise _brick_exists(existing)

    def add_brick(
        self,
        draft: domain.BrickDraft,
        *,
        embedded: EmbeddedTexts | None = None,
        actor: str | None = None,
        blobs_present: Callable[[], bool] | None = None,
    ) -> domain.Brick:
        """Store a brick version and its search index entries; ``draft.version`` None takes
        the next free number.

        Versions are handed out by a row lock on the brick's name, so concurrent
        registrations of one name get distinct, gap-free versions.

        Raises:
            BaseModelNotFound: the base model is gone.
            BrickExists: the same weights with the same config are already registered.
            VersionExists: the explicit version is taken.
            ServiceUnavailable: ``blobs_present`` answered False (a concurrent ``fsck
                --repair`` collected the bytes): nothing was recorded, register again.
        """
        try:
            with self.db.session(write=True) as session:
                lock_blob_collection(session)
                if blobs_present is not None and not blobs_present():
                    raise ServiceUnavailable(
                        "the brick's stored bytes were collected while it was being registered; register it again"
                    )
                base_id = session.scalar(select(BaseModelRow.id).where(BaseModelRow.name == draft.base_model))
                if base_id is None:
                    raise BaseModelNotFound(
                        f"no base model named {draft.base_model!r} is registered", extra={"name": draft.base_model}
                    )
                version = _allocate_version(session, draft.name, draft.version)
                now = utcnow()
                row = BrickRow.from_draft(draft, version=version, base_model_id=base_id, at=now, created_by=actor)
                session.add(row)
                session.flush()
                if embedded is not None:
                    write_brick_index(session, row.id, embedded)
                else:
                    bump_generation(session)
                _refresh_latest(session, draft.name)
                record_event(
                    session, actor, "brick.register", f"brick:{draft.name}@{version}", {"sha256": draft.sha256}
                )
                session.refresh(row)
                return row.to_domain()
        except Conflict as exc:
            if isinstance(exc, (BrickExists, NameTaken, VersionExists)):
                raise
            existing = self.find_brick_by_sha256(draft.sha256, draft.config_sha256)
            if existing is not None:
                raise _brick_exists(existing) from exc
            raise

    def get_brick(self, name: str, version: int | None = None) -> domain.Brick:
        """A brick version; ``version`` None gives the latest.

        Raises:
            BrickNotFound: no such brick or version.
        """
        with self.db.session() as session:
            return _get_row(session, name, version).to_domain()

    def list_bricks(
        self,
        *,
        name: str | None = None,
        base_model: str | None = None,
        tag: str | None = None,
        all_versions: bool = False,
        cursor: str | None = None,
        limit: int = 50,
        kind: str | None = None,
    ) -> domain.Page[domain.Brick]:
        """A page of bricks ordered by name, newest version first.

        Args:
            name: only versions of this brick.
            base_model: only bricks of this base model.
            tag: only bricks carrying this tag.
            all_versions: list every version, not only the latest of each name.
            cursor: ``next_cursor`` of the previous page.
            limit: page size.
            kind: only bricks of this kind (``lora`` or ``emergent``).
        """
        query = _bricks_query(base_model=base_model, tag=tag, all_versions=all_versions)
        if kind is not None:
            query = query.where(BrickRow.kind == kind)
        if name is not None:
            query = query.where(BrickRow.name == name)
        if cursor is not None:
            name, version = _decode_cursor(cursor)
            query = query.where((BrickRow.name > name) | and_(BrickRow.name == name, BrickRow.version < version))
        query = query.order_by(BrickRow.name, BrickRow.version.desc()).limit(limit + 1)
        with self.db.session() as session:
            rows = list(session.scalars(query))
            items = [r.to_domain() for r in rows[:limit]]
        next_cursor = _encode_cursor(items[-1].name, items[-1].version) if len(rows) > limit else None
        return domain.Page(items=items, next_cursor=next_cursor)

    def update_brick(
        self,
        name: str,
        version: int,
        patch: domain.BrickPatch,
        *,
        embedded: EmbeddedTexts | None = None,
        actor: str | None = None,
    ) -> domain.Brick:
        """Apply ``patch`` to a brick version; ``embedded`` replaces its index entries
        (pass it when the description or the examples change).

        Raises:
            BrickNotFound: no such brick version.
        """
        with self.db.session(write=True) as session:
            row = _get_row(session, name, version)
            if embedded is not None:
                remove_brick_index(session, row.id, row.description, row.examples)
                write_brick_index(session, row.id, embedded)
            else:
                bump_generation(session)
            if patch.description is not None:
                row.description = patch.description
            if patch.examples is not None:
                row.examples = list(patch.examples)
            if patch.tags is not None:
                row.tag_rows = [BrickTagRow(tag=t) for t in sorted(set(patch.tags))]
            row.updated_at = utcnow()
            changed = [f for f in ("description", "examples", "tags") if getattr(patch, f) is not None]
            record_event(session, actor, "brick.update", f"brick:{name}@{version}", {"fields": changed})
            session.flush()
            session.refresh(row)
            return row.to_domain()

    def delete_brick(self, name: str, version: int, *, actor: str | None = None) -> domain.Brick:
        """Delete a brick version (its version number is never handed out again).

        Returns:
            The deleted brick.

        Raises:
            BrickNotFound: no such brick version.
        """
        with self.db.session(write=True) as session:
            row = _get_row(session, name, version)
            brick = row.to_domain()
            remove_brick_index(session, row.id, row.description, row.examples)
            session.delete(row)
            session.flush()
            _refresh_latest(session, name)
            record_event(session, actor, "brick.delete", f"brick:{name}@{version}", {"sha256": brick.sha256})
            return brick

    def ensure_index_model(self, model: str) -> None:
        """Raise `ServiceUnavailable` when the search index holds another model's vectors."""
        with self.db.session() as session:
            stored = read_index_model(session)
        check_index_model(stored, model)

    def get_bricks_by_ids(self, ids: list[int]) -> dict[int, domain.Brick]:
        """Bricks by row id (missing ids are left out)."""
        if not ids:
            return {}
        with self.db.session() as session:
            return {row.id: row.to_domain() for row in session.scalars(select(BrickRow).where(BrickRow.id.in_(ids)))}

    def brick_stamps(self, ids: list[int]) -> dict[int, datetime]:
        """``updated_at`` by row id (missing ids are left out): whether a copy of a brick is
        still current, for a fraction of the cost of reading it."""
        if not ids:
            return {}
        with self.db.session() as session:
            rows = session.execute(select(BrickRow.id, BrickRow.updated_at).where(BrickRow.id.in_(ids)))
            return {row.id: as_utc(row.updated_at) for row in rows}

    def all_brick_texts(self) -> list[tuple[int, str, tuple[str, ...]]]:
        """(row id, description, examples) of every brick version, for re-indexing."""
        with self.db.session() as session:
            rows = session.execute(select(BrickRow.id, BrickRow.description, BrickRow.examples).order_by(BrickRow.id))
            return [(row.id, row.description, tuple(row.examples)) for row in rows]

    def replace_index(
        self,
        embedded: dict[int, EmbeddedTexts],
        *,
        embed: Callable[[str, tuple[str, ...]], EmbeddedTexts],
    ) -> None:
        """Rebuild the whole search index from ``embedded`` in one transaction; bricks
        added or edited since ``embedded`` was computed are embedded here with ``embed``."""
        with self.db.session(write=True) as session:
            rows = session.execute(select(BrickRow.id, BrickRow.description, BrickRow.examples).order_by(BrickRow.id))
            entries = []
            for brick_id, description, examples in rows:
                item = embedded.get(brick_id)
                if item is None or item.description != description or item.examples != tuple(examples):
                    item = embed(description, tuple(examples))
                entries.append((brick_id, item))
            rebuild_index(session, entries)

    def ping(self) -> str:
        """Run ``SELECT 1``; returns the dialect name (``sqlite`` or ``postgresql``)."""
        with self.db.session() as session:
            session.execute(text("SELECT 1"))
        return self.db.dialect

    def events(self, subject_prefix: str | None = None, *, limit: int = 200) -> list[Event]:
        """Audit events, newest first."""
        with self.db.session() as session:
            return list_events(session, subject_prefix=subject_prefix, limit=limit)

    def referenced_blobs(self) -> set[str]:
        """sha256 of every blob a brick row points at (weights and configs)."""
        return {digest for digests in self.blob_references().values() for digest in digests}

    def blob_references(self) -> dict[str, tuple[str, str]]:
        """``name@version`` -> (weights sha256, config sha256), for every brick version."""
        with self.db.session() as session:
            rows = session.execute(select(BrickRow.name, BrickRow.version, BrickRow.sha256, BrickRow.config_sha256))
            return {f"{r.name}@{r.version}": (r.sha256, r.config_sha256) for r in rows}

    def delete_blob_if_unreferenced(self, digest: str, delete: Callable[[], bool]) -> bool:
        """Run ``delete`` (which may still decline, e.g. the blob is young again) only while
        no row references ``digest`` (a brick, a published composition's file, a job's
        recipe: `blob_referenced`), holding the lock every writer of such a row takes: a
        writer either commits first (and its row is seen here) or finds its bytes gone and
        records nothing. Returns whether it was deleted."""
        with self.db.session(write=True) as session:
            lock_blob_collection(session, exclusive=True)
            if blob_referenced(session, digest):
                return False
            return delete()

    def count_bricks(self) -> int:
        """Number of brick versions."""
        with self.db.session() as session:
            return session.scalar(select(func.count()).select_from(BrickRow)) or 0


_IN_USE_SHOWN = 20


def _at_least(count: int) -> str:
    return f"{_IN_USE_SHOWN}+" if count > _IN_USE_SHOWN else str(count)


def _brick_exists(existing: domain.Brick) -> BrickExists:
    return BrickExists(
        f"these weights and this adapter_config are already registered as {existing.ref}",
        extra={"existing": {"name": existing.name, "version": existing.version, "sha256": existing.sha256}},
    )


def _version_row_exists(session: Session, name: str, version: int) -> bool:
    return bool(session.scalar(select(exists().where(BrickRow.name == name, BrickRow.version == version))))


def _allocate_version(session: Session, name: str, requested: int | None) -> int:
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(
        insert(BrickNameRow).values(name=name, last_version=0, created_at=utcnow()).on_conflict_do_nothing()
    )
    # After the insert: a concurrent twin's insert has committed by now (or this one won).
    refuse_case_twin(session, BrickNameRow.name, BrickNameRow.name_folded, name, what="brick")
    if requested is None:
        result = session.execute(
            update(BrickNameRow)
            .where(BrickNameRow.name == name)
            .values(last_version=BrickNameRow.last_version + 1)
            .returning(BrickNameRow.last_version)
        )
        return int(result.scalar_one())
    # Lock the name row (PostgreSQL; SQLite's BEGIN IMMEDIATE already serialises writers).
    last = session.scalar(select(BrickNameRow.last_version).where(BrickNameRow.name == name).with_for_update())
    if _version_row_exists(session, name, requested):
        raise VersionExists(f"{name}@{requested} already exists", extra={"name": name, "version": requested})
    if last is not None and requested > last:
        session.execute(update(BrickNameRow).where(BrickNameRow.name == name).values(last_version=requested))
    return requested


def _refresh_latest(session: Session, name: str) -> None:
    """Flag the highest version of ``name`` as the latest, and only it."""
    top = select(func.max(BrickRow.version)).where(BrickRow.name == name).scalar_subquery()
    session.execute(update(BrickRow).where(BrickRow.name == name).values(is_latest=BrickRow.version == top))


def _get_row(session: Session, name: str, version: int | None) -> BrickRow:
    query = select(BrickRow).where(BrickRow.name == name)
    query = (
        query.order_by(BrickRow.version.desc()).limit(1)
        if version is None
        else query.where(BrickRow.version == version)
    )
    row = session.scalar(query)
    if row is None:
        what = f"{name}@{version}" if version is not None else name
        raise BrickNotFound(f"no brick {what!r} is registered", extra={"name": name, "version": version})
    return row


def _bricks_query(*, base_model: str | None, tag: str | None, all_versions: bool) -> Select[BrickRow]:
    query = select(BrickRow)
    if not all_versions:
        query = query.where(BrickRow.is_latest)
    if base_model is not None:
        query = query.join(BaseModelRow, BrickRow.base_model_id == BaseModelRow.id).where(
            BaseModelRow.name == base_model
        )
    if tag is not None:
        query = query.where(exists().where(BrickTagRow.brick_id == BrickRow.id, BrickTagRow.tag == tag))
    return query


def _encode_cursor(name: str, version: int) -> str:
    return base64.urlsafe_b64encode(json.dumps([name, version]).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        name, version = json.loads(raw)
        if isinstance(name, str) and isinstance(version, int) and not isinstance(version, bool):
            return name, version
    except (binascii.Error, ValueError, TypeError):
        pass
    raise InvalidInput("invalid cursor", errors=["cursor: pass the next_cursor of a previous page unchanged"])
