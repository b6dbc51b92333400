"""composition names, the bricks of each composition, brick version aliases

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 07:40:00

Compositions become manageable: a name can point at one (``composition_names``), listings
filter by brick through an index (``composition_bricks``, back-filled from the recipes), and
brick versions get aliases (``brick_aliases``: ``sentiment@production``). Cancelling needs no
column: ``cancelled`` is one more value of ``compositions.status``.
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "composition_names",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("composition_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(
            ["composition_id"],
            ["compositions.id"],
            name=op.f("fk_composition_names_composition_id_compositions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_composition_names")),
    )
    op.create_index(op.f("ix_composition_names_composition_id"), "composition_names", ["composition_id"], unique=False)
    bricks = op.create_table(
        "composition_bricks",
        sa.Column("composition_id", sa.String(length=64), nullable=False),
        sa.Column("brick_name", sa.String(length=100), nullable=False),
        sa.ForeignKeyConstraint(
            ["composition_id"],
            ["compositions.id"],
            name=op.f("fk_composition_bricks_composition_id_compositions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("composition_id", "brick_name", name=op.f("pk_composition_bricks")),
    )
    op.create_index(op.f("ix_composition_bricks_brick_name"), "composition_bricks", ["brick_name"], unique=False)
    op.create_table(
        "brick_aliases",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("alias", sa.String(length=100), nullable=False),
        sa.Column("version", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=True),
        sa.ForeignKeyConstraint(["name"], ["brick_names.name"], name=op.f("fk_brick_aliases_name_brick_names")),
        sa.PrimaryKeyConstraint("name", "alias", name=op.f("pk_brick_aliases")),
    )
    connection = op.get_bind()
    rows = []
    for composition_id, recipe in connection.execute(sa.text("SELECT id, recipe FROM compositions")):
        document = json.loads(recipe) if isinstance(recipe, str) else recipe
        for name in sorted({b["name"] for b in document.get("bricks", [])}):
            rows.append({"composition_id": composition_id, "brick_name": name})
    if rows:
        op.bulk_insert(bricks, rows)


def downgrade() -> None:
    op.drop_table("brick_aliases")
    op.drop_index(op.f("ix_composition_bricks_brick_name"), table_name="composition_bricks")
    op.drop_table("composition_bricks")
    op.drop_index(op.f("ix_composition_names_composition_id"), table_name="composition_names")
    op.drop_table("composition_names")
