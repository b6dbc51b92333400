"""API tokens and scopes.

A token is ``bky_`` + 43 random URL-safe characters (256 bits). Only its sha256 is
stored (tokens are random, so a fast hash is enough: there is nothing to brute-force);
a presented token is hashed, looked up, and compared in constant time. Scopes are
ordered: ``admin`` implies ``write``, which implies ``read``.

=============  ==========================================================
scope          may
=============  ==========================================================
read           list, show, search, download (when reads are not open)
write          register, patch and delete bricks, register base models,
               request compositions
admin          create, list and revoke tokens
=============  ==========================================================
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select, update

from registry.db.events import record_event
from registry.db.models import ApiTokenRow, utcnow
from registry.db.session import Database
from registry.errors import Conflict, Forbidden, NotFound, Unauthorized

__all__ = ["ANONYMOUS", "SCOPES", "Actor", "Scope", "TokenInfo", "TokenStore", "hash_token", "new_token", "require"]

Scope = Literal["read", "write", "admin"]
SCOPES: tuple[Scope, ...] = ("read", "write", "admin")
_PREFIX = "bky_"


def new_token() -> str:
    """A fresh random token."""
    return _PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The stored form of a token."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class Actor:
    """Who makes a request: a token's name and scope (``anonymous`` for open reads)."""

    name: str
    scope: Scope | None

    def allows(self, needed: Scope) -> bool:
        """Whether this actor's scope covers ``needed``."""
        return self.scope is not None and SCOPES.index(self.scope) >= SCOPES.index(needed)


ANONYMOUS = Actor("anonymous", None)


@dataclass(frozen=True)
class TokenInfo:
    """A token as listed (never the secret)."""

    name: str
    scope: Scope
    prefix: str
    created_at: datetime
    created_by: str | None
    last_used_at: datetime | None
    revoked_at: datetime | None


def _info(row: ApiTokenRow) -> TokenInfo:
    from registry.db.models import as_utc

    return TokenInfo(
        name=row.name,
        scope=row.scope,  # type: ignore[arg-type]
        prefix=row.prefix,
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        last_used_at=as_utc(row.last_used_at) if row.last_used_at else None,
        revoked_at=as_utc(row.revoked_at) if row.revoked_at else None,
    )


_REMEMBERED_TOKENS = 1024


@dataclass(frozen=True)
class _Known:
    """A valid token as read at database change marker ``marker``."""

    marker: int
    token_id: int
    actor: Actor
    last_used_at: datetime | None


class TokenStore:
    """API tokens in SQL.

    Every request presents its token, and reading it costs about as much CPU as the rest of
    a served completion's handling in the gateway (profiled). So a valid token is remembered
    with the database's change marker (`Database.change_marker`: any commit by any process
    moves it); while the marker stays, nothing can have revoked it and `remembered` answers
    without a query. Where there is no marker (PostgreSQL) every request reads the row.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._known: dict[str, _Known] = {}

    def create(self, name: str, scope: Scope, *, actor: str | None) -> tuple[str, TokenInfo]:
        """Create a token; the secret is returned once and never stored.

        Raises:
            Conflict: a token of that name exists (revoked tokens keep their name).
        """
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r}")
        token = new_token()
        row = ApiTokenRow(
            name=name,
            scope=scope,
            token_hash=hash_token(token),
            prefix=token[:10],
            created_by=actor,
            created_at=utcnow(),
        )
        try:
            with self.db.session(write=True) as session:
                session.add(row)
                session.flush()
                record_event(session, actor, "token.create", f"token:{name}", {"scope": scope})
                return token, _info(row)
        except Conflict:
            raise Conflict(f"a token named {name!r} exists already", extra={"name": name}) from None

    def list(self) -> list[TokenInfo]:
        """Every token, revoked ones included."""
        with self.db.session() as session:
            return [_info(r) for r in session.scalars(select(ApiTokenRow).order_by(ApiTokenRow.name))]

    def revoke(self, name: str, *, actor: str | None) -> TokenInfo:
        """Revoke a token (it stops working at once)."""
        with self.db.session(write=True) as session:
            row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.name == name))
            if row is None:
                raise NotFound(f"no token named {name!r}", extra={"name": name})
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                record_event(session, actor, "token.revoke", f"token:{name}", {})
            return _info(row)

    def any_admin(self) -> bool:
        """Whether an unrevoked admin token exists."""
        with self.db.session() as session:
            found = session.scalar(
                select(ApiTokenRow.id).where(ApiTokenRow.scope == "admin", ApiTokenRow.revoked_at.is_(None)).limit(1)
            )
            return found is not None

    def authenticate(self, token: str) -> Actor:
        """The actor a presented token stands for.

        Raises:
            Unauthorized: unknown or revoked token.
        """
        digest = hash_token(token)
        known = self._remembered(digest)
        if known is not None:
            return known
        marker = self.db.change_marker()  # before the read: a later commit moves it
        # Columns, not the ORM entity: every request comes through here, and building an
        # instance (identity map, attribute state) costs more than the query on SQLite.
        columns = (ApiTokenRow.id, ApiTokenRow.name, ApiTokenRow.scope, ApiTokenRow.token_hash,
                   ApiTokenRow.revoked_at, ApiTokenRow.last_used_at)  # fmt: skip
        with self.db.session() as session:
            row = session.execute(select(*columns).where(ApiTokenRow.token_hash == digest)).first()
        if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at is not None:
            raise Unauthorized("the API token is not valid (unknown or revoked)")
        actor = Actor(row.name, row.scope)
        if not self._touch(row.id, row.last_used_at) and marker is not None:
            if len(self._known) >= _REMEMBERED_TOKENS:
                self._known.clear()
            self._known[digest] = _Known(marker, row.id, actor, row.last_used_at)
        return actor

    def remembered(self, token: str) -> Actor | None:
        """The actor of ``token`` if it was found valid and nothing was committed since (no
        query: cheap enough for an event loop); None: call `authenticate`."""
        return self._remembered(hash_token(token))

    def _remembered(self, digest: str) -> Actor | None:
        known = self._known.get(digest)
        if known is None or self.db.change_marker() != known.marker or _touch_due(known.last_used_at):
            return None
        return known.actor

    def _touch(self, token_id: int, last_used: datetime | None) -> bool:
        """Record the use if the last one is a minute old; whether it wrote."""
        if not _touch_due(last_used):
            return False
        with self.db.session(write=True) as session:
            session.execute(update(ApiTokenRow).where(ApiTokenRow.id == token_id).values(last_used_at=utcnow()))
        return True


def _touch_due(last_used: datetime | None) -> bool:
    """Whether a use should be recorded: one write a minute per token is enough for "last used"."""
    if last_used is None:
        return True
    from registry.db.models import as_utc

    return (utcnow() - as_utc(last_used)).total_seconds() >= 60


def require(actor: Actor, needed: Scope) -> Actor:
    """``actor`` if it may act with ``needed`` scope.

    Raises:
        Unauthorized: no token was presented. Forbidden: the token's scope is too small.
    """
    if actor.allows(needed):
        return actor
    if actor.scope is None:
        raise Unauthorized(f"this operation needs a token with scope {needed!r}; send 'Authorization: Bearer <token>'")
    raise Forbidden(
        f"token {actor.name!r} has scope {actor.scope!r}; this operation needs {needed!r}",
        extra={"scope": actor.scope, "needed": needed},
    )
