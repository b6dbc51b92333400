"""a brick is identified by its config and weights together

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 08:00:00

The same weights with another ``adapter_config.json`` (a corrected ``lora_alpha``, rsLoRA
switched on) are another brick: the unique constraint moves from ``sha256`` alone to
``(sha256, config_sha256)``; ``sha256`` keeps an index for look-ups by weights.
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("bricks") as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_bricks_sha256"), type_="unique")
        batch_op.create_unique_constraint("uq_bricks_sha256_config", ["sha256", "config_sha256"])
        batch_op.create_index(batch_op.f("ix_bricks_sha256"), ["sha256"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("bricks") as batch_op:
        batch_op.drop_index(batch_op.f("ix_bricks_sha256"))
        batch_op.drop_constraint("uq_bricks_sha256_config", type_="unique")
        batch_op.create_unique_constraint(batch_op.f("uq_bricks_sha256"), ["sha256"])
