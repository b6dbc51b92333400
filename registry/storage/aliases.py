"""Brick version aliases (MLflow-style ``production``, ``staging``): the SQL store and the
parsing of references, ``NAME``, ``NAME@VERSION`` or ``NAME@ALIAS``.

An alias names one version of one brick; setting it again moves it. It is resolved when a
request arrives (a composition recipe records the resolved version, so a recipe's id
does not change when the alias later moves).
"""

from __future__ import annotations

import re

from sqlalchemy import select

from registry import domain
from registry.db.models import BrickAliasRow, utcnow
from registry.db.names import refuse_case_twin
from registry.db.session import Database
from registry.errors import BrickNotFound, InvalidInput
from registry.inputs import NAME_PATTERN

__all__ = ["RESERVED_ALIASES", "BrickAliasStore", "check_alias", "parse_version_or_alias"]

# "main" is the Hub's name for the latest version (registry.hub), "latest" the obvious one:
# both mean "the newest version" and cannot be pointed elsewhere.
RESERVED_ALIASES = frozenset({"main", "latest"})


def check_alias(alias: str) -> str:
    """``alias`` if it can name a version: a name that is not a number nor reserved.

    Raises:
        InvalidInput: why it cannot.
    """
    if not re.match(NAME_PATTERN, alias):
        raise InvalidInput(
            f"invalid alias {alias[:100]!r}", errors=["alias: 1-100 ASCII letters, digits, '.', '_' or '-'"]
        )
    if alias.isdigit():
        raise InvalidInput(f"invalid alias {alias!r}", errors=["alias: a number would read as a version"])
    if alias.lower() in RESERVED_ALIASES:
        raise InvalidInput(f"invalid alias {alias!r}", errors=[f"alias: {alias!r} always means the latest version"])
    return alias


def parse_version_or_alias(text: str) -> int | str | None:
    """What follows ``@`` in a reference: a version number, an alias, or None for the latest
    (empty, ``latest`` or ``main``)."""
    if not text or text.lower() in RESERVED_ALIASES:
        return None
    if text.isascii() and text.isdigit():
        return int(text)
    return text


class BrickAliasStore:
    """Brick aliases in SQL; every method is one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def set(self, name: str, alias: str, version: int, actor: str | None) -> domain.BrickAlias:
        """Point ``name@alias`` at ``version`` (the caller checked the version exists)."""
        with self.db.session(write=True) as session:
            row = session.get(BrickAliasRow, (name, alias))
            if row is None:
                refuse_case_twin(
                    session,
                    BrickAliasRow.alias,
                    BrickAliasRow.alias_folded,
                    alias,
                    what=f"alias of brick {name!r}",
                    scope=BrickAliasRow.name == name,
                )
                row = BrickAliasRow(name=name, alias=alias, version=version, created_by=actor, created_at=utcnow())
                session.add(row)
            else:
                row.version, row.created_by, row.created_at = version, actor, utcnow()
            session.flush()
            return _to_domain(row)

    def remove(self, name: str, alias: str) -> domain.BrickAlias:
        """Remove an alias (`BrickNotFound` when it does not exist)."""
        with self.db.session(write=True) as session:
            row = session.get(BrickAliasRow, (name, alias))
            if row is None:
                raise BrickNotFound(f"brick {name!r} has no alias {alias[:100]!r}", extra={"name": name})
            gone = _to_domain(row)
            session.delete(row)
            return gone

    def version_of(self, name: str, alias: str) -> int | None:
        """The version ``name@alias`` points at, or None."""
        with self.db.session() as session:
            return session.scalar(
                select(BrickAliasRow.version).where(BrickAliasRow.name == name, BrickAliasRow.alias == alias)
            )

    def of_brick(self, name: str) -> list[domain.BrickAlias]:
        """Every alias of brick ``name``, by alias."""
        with self.db.session() as session:
            rows = session.scalars(
                select(BrickAliasRow).where(BrickAliasRow.name == name).order_by(BrickAliasRow.alias)
            ).all()
            return [_to_domain(r) for r in rows]


def _to_domain(row: BrickAliasRow) -> domain.BrickAlias:
    from registry.db.models import as_utc

    return domain.BrickAlias(
        name=row.name,
        alias=row.alias,
        version=row.version,
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
    )
