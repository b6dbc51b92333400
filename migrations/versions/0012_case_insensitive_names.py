"""names unique case-insensitively: a stored folded name under a unique index

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 09:40:00

``Fine`` and ``fine`` must not name two things (registry.db.names). Each named table gets
``name_folded`` (brick aliases: ``alias_folded``, unique per brick), filled by the store on
insert; here it is back-filled with ``lower()`` (names are ASCII, where ``lower()`` and
Python's ``str.lower`` agree). A stored column rather than a ``lower(name)`` expression
index: the models can declare it, so the schema-drift check sees the same schema on both
backends. Rows that already collide stop the upgrade with a message listing them, before
anything is changed; rename or delete one of each pair, then upgrade again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# (table, name column, folded column, columns the uniqueness is scoped to)
_NAMED = (
    ("base_models", "name", "name_folded", ()),
    ("brick_names", "name", "name_folded", ()),
    ("composition_names", "name", "name_folded", ()),
    ("brick_aliases", "alias", "alias_folded", ("name",)),
)


def _collisions(connection: sa.Connection) -> list[str]:
    found = []
    for table, column, _, scope in _NAMED:
        keys = ", ".join([*scope, f"lower({column})"])
        rows = connection.execute(
            sa.text(f"SELECT {keys}, count(*) FROM {table} GROUP BY {keys} HAVING count(*) > 1")
        ).all()
        for row in rows:
            spellings = connection.execute(
                sa.text(
                    f"SELECT {column} FROM {table} WHERE lower({column}) = :folded"
                    + "".join(f" AND {c} = :{c}" for c in scope)
                ),
                {"folded": row[len(scope)], **{c: row[i] for i, c in enumerate(scope)}},
            ).scalars()
            where = "".join(f" of {c} {row[i]!r}" for i, c in enumerate(scope))
            found.append(f"{table}{where}: {', '.join(sorted(spellings))}")
    return found


def upgrade() -> None:
    connection = op.get_bind()
    collisions = _collisions(connection)
    if collisions:
        raise RuntimeError(
            "names must be unique case-insensitively, and these differ only in letter case: "
            + "; ".join(collisions)
            + ". Rename or delete one of each, then run the upgrade again (nothing was changed)."
        )
    for table, column, folded, scope in _NAMED:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column(folded, sa.String(length=100), nullable=True))
        connection.execute(sa.text(f"UPDATE {table} SET {folded} = lower({column})"))
        with op.batch_alter_table(table) as batch:
            batch.alter_column(folded, existing_type=sa.String(length=100), nullable=False)
            if scope:
                batch.create_unique_constraint(f"uq_{table}_{scope[0]}_{folded}", [*scope, folded])
            else:
                batch.create_unique_constraint(f"uq_{table}_{folded}", [folded])


def downgrade() -> None:
    for table, _, folded, scope in reversed(_NAMED):
        with op.batch_alter_table(table) as batch:
            name = f"uq_{table}_{scope[0]}_{folded}" if scope else f"uq_{table}_{folded}"
            batch.drop_constraint(name, type_="unique")
            batch.drop_column(folded)
