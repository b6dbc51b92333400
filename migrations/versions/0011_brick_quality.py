"""brick quality: eval pairs given at registration and the measured base-vs-brick quality

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-07 08:10:00

``evals`` (input/output pairs) and ``eval_prompt`` come with the registration; a worker
measures base and brick on them and writes ``quality``. ``quality_status`` is the job's
state (queued, running, done, failed; NULL when the brick has no evals), indexed because
workers look for queued bricks.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("bricks") as batch:
        batch.add_column(sa.Column("evals", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("eval_prompt", sa.String(length=500), nullable=True))
        batch.add_column(sa.Column("quality", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("quality_status", sa.String(length=16), nullable=True))
        batch.create_index("ix_bricks_quality_status", ["quality_status"])


def downgrade() -> None:
    with op.batch_alter_table("bricks") as batch:
        batch.drop_index("ix_bricks_quality_status")
        batch.drop_column("quality_status")
        batch.drop_column("quality")
        batch.drop_column("eval_prompt")
        batch.drop_column("evals")
