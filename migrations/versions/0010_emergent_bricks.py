"""bricks of kind emergent: a kind column and the emergent metadata

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07 08:00:00

Every existing brick is a LoRA (``kind = 'lora'``). An emergent brick (a neuron set of a
base model, issue #22) keeps its neuron file in the blob store like adapter weights and its
provenance (method, parameters, probe-set hashes, statistics sizes, verification table) in
``emergent`` (JSON, NULL for LoRA bricks).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("bricks") as batch:
        batch.add_column(sa.Column("kind", sa.String(length=16), server_default="lora", nullable=False))
        batch.add_column(sa.Column("emergent", sa.JSON(), nullable=True))
        batch.create_index(batch.f("ix_bricks_kind"), ["kind"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("bricks") as batch:
        batch.drop_index(batch.f("ix_bricks_kind"))
        batch.drop_column("emergent")
        batch.drop_column("kind")
