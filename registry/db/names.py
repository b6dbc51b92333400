"""Names are unique case-insensitively: ``Fine`` and ``fine`` never name two different base
models, bricks, brick aliases or compositions (they read the same to people, and some file
systems and URLs fold case). Each such table stores the folded name next to the name, under
a unique index (migration 0012); lookups stay exact, so the folded column only guards
uniqueness, and a name taken in another case is a 409 naming the existing one.

Names are ASCII (`registry.inputs.NAME_PATTERN`), so folding is ``str.lower`` here and
``lower()`` in the migration's back-fill, which agree on ASCII.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import InstrumentedAttribute, Session
from sqlalchemy.sql.elements import ColumnElement

from registry.errors import NameTaken

__all__ = ["fold_name", "folded_default", "refuse_case_twin"]


def fold_name(name: str) -> str:
    """The case-folded form of a name (the key of its uniqueness)."""
    return name.lower()


def folded_default(column: str) -> Callable[[Any], str]:
    """A column default filling the folded form of ``column`` on insert (ORM and Core)."""

    def default(context: Any) -> str:
        return fold_name(str(context.get_current_parameters()[column]))

    return default


def refuse_case_twin(
    session: Session,
    name_column: InstrumentedAttribute[str],
    folded_column: InstrumentedAttribute[str],
    name: str,
    *,
    what: str,
    scope: ColumnElement[bool] | None = None,
) -> None:
    """Raise `NameTaken` when another row (within ``scope``) holds ``name`` in another letter
    case; an exact match is the caller's business (usually "the same thing again").

    Raises:
        NameTaken: naming the existing spelling in the message and ``extra["existing"]``.
    """
    query = select(name_column).where(folded_column == fold_name(name), name_column != name)
    if scope is not None:
        query = query.where(scope)
    existing = session.scalar(query.limit(1))
    if existing is not None:
        raise NameTaken(
            f"{what} {name!r} differs only in letter case from the existing {existing!r}; names are unique "
            f"case-insensitively: use {existing!r} or another name",
            extra={"name": name, "existing": existing},
        )
