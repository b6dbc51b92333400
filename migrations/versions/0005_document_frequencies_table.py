"""document frequencies in their own table, one row per feature

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 14:00:00

The three dense document-frequency arrays (1 MiB each) in ``retrieval_stats`` were read and
rewritten whole by every registration and re-read by every search process after it. Now each
feature seen has a row in ``retrieval_df``, and a registration touches only its own.
"""

from __future__ import annotations

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

VIEWS = ("shape", "prefix", "word")  # as of this revision (registry.search.lexical.VIEWS)
HASH_DIM = 1 << 18


def upgrade() -> None:
    df = op.create_table(
        "retrieval_df",
        sa.Column("view", sa.String(length=16), nullable=False),
        sa.Column("bucket", sa.Integer(), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("view", "bucket", name=op.f("pk_retrieval_df")),
    )
    op.create_index(op.f("ix_retrieval_df_generation"), "retrieval_df", ["generation"], unique=False)
    connection = op.get_bind()
    generation = connection.execute(sa.text("SELECT generation FROM index_state WHERE id = 1")).scalar() or 0
    row = connection.execute(
        sa.text(f"SELECT {', '.join(f'df_{v}' for v in VIEWS)} FROM retrieval_stats WHERE id = 1")
    ).first()
    rows = []
    for view, raw in zip(VIEWS, row or (), strict=False):
        if raw is not None:
            counts = np.frombuffer(bytes(raw), dtype="<i4")
            rows += [
                {"view": view, "bucket": int(b), "count": int(counts[b]), "generation": int(generation)}
                for b in np.flatnonzero(counts)
            ]
    if rows:
        op.bulk_insert(df, rows)
    with op.batch_alter_table("retrieval_stats") as batch:
        for view in VIEWS:
            batch.drop_column(f"df_{view}")


def downgrade() -> None:
    with op.batch_alter_table("retrieval_stats") as batch:
        for view in VIEWS:
            batch.add_column(sa.Column(f"df_{view}", sa.LargeBinary(), nullable=True))
    connection = op.get_bind()
    dense = {view: np.zeros(HASH_DIM, "<i4") for view in VIEWS}
    for view, bucket, count in connection.execute(sa.text("SELECT view, bucket, count FROM retrieval_df")):
        if view in dense:
            dense[view][bucket] = count
    if connection.execute(sa.text("SELECT dim FROM retrieval_stats WHERE id = 1")).scalar() is not None:
        connection.execute(
            sa.text(f"UPDATE retrieval_stats SET {', '.join(f'df_{v} = :{v}' for v in VIEWS)} WHERE id = 1"),
            {view: dense[view].tobytes() for view in VIEWS},
        )
    op.drop_index(op.f("ix_retrieval_df_generation"), table_name="retrieval_df")
    op.drop_table("retrieval_df")
