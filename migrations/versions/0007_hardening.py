"""64-bit versions, composition download leases

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 08:00:00

- ``bricks.version`` and ``brick_names.last_version`` become ``bigint`` on PostgreSQL (an
  explicit version 2^31 - 1 made the next automatic one unreadable); SQLite integers are
  64-bit already.
- ``composition_leases``: downloads in progress, which cache eviction must not cut.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("bricks", "version", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False)
        op.alter_column(
            "brick_names", "last_version", type_=sa.BigInteger(), existing_type=sa.Integer(), existing_nullable=False
        )
    op.create_table(
        "composition_leases",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("composition_id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_composition_leases_composition_id", "composition_leases", ["composition_id"])


def downgrade() -> None:
    op.drop_index("ix_composition_leases_composition_id", table_name="composition_leases")
    op.drop_table("composition_leases")
    if op.get_bind().dialect.name == "postgresql":
        op.alter_column("brick_names", "last_version", type_=sa.Integer(), existing_type=sa.BigInteger())
        op.alter_column("bricks", "version", type_=sa.Integer(), existing_type=sa.BigInteger())
