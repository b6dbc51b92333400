"""retrieval vectors

Embedded texts of bricks (description + examples), one row each; each brick's lexical
vectors; the corpus statistics ranking needs; a generation counter that tells in-process
indexes to reload; and the ``is_latest`` flag that retrieval filters on. On PostgreSQL the
vectors are pgvector ``vector`` values with an HNSW cosine index per embedding dimension (an expression index on
``embedding::vector(384)`` restricted to ``dim = 384``, the default model's size).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 09:51:58.748771
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from registry.db.models import Embedding

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

DEFAULT_DIM = 384
VIEWS = ("shape", "prefix", "word")


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS vector")
    op.create_table(
        "index_state",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_index_state")),
    )
    op.execute("INSERT INTO index_state (id, generation) VALUES (1, 0)")
    op.create_table(
        "brick_vectors",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("brick_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("embedding", Embedding(), nullable=False),
        sa.ForeignKeyConstraint(
            ["brick_id"], ["bricks.id"], name=op.f("fk_brick_vectors_brick_id_bricks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_brick_vectors")),
    )
    with op.batch_alter_table("brick_vectors", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_brick_vectors_brick_id"), ["brick_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_brick_vectors_model"), ["model"], unique=False)
    if bind.dialect.name == "postgresql":
        op.execute(
            f"CREATE INDEX ix_hnsw_brick_vectors_{DEFAULT_DIM} ON brick_vectors "
            f"USING hnsw ((embedding::vector({DEFAULT_DIM})) vector_cosine_ops) WHERE dim = {DEFAULT_DIM}"
        )

    op.create_table(
        "brick_lexical",
        sa.Column("brick_id", sa.Integer(), nullable=False),
        *(sa.Column(f"{view}_{part}", sa.LargeBinary(), nullable=False) for view in VIEWS for part in ("idx", "val")),
        sa.Column("layer_sum", sa.LargeBinary(), nullable=False),
        sa.Column("layer_sumsq", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["brick_id"], ["bricks.id"], name=op.f("fk_brick_lexical_brick_id_bricks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("brick_id", name=op.f("pk_brick_lexical")),
    )
    op.create_table(
        "retrieval_stats",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("dim", sa.Integer(), nullable=True),
        sa.Column("n_docs", sa.BigInteger(), nullable=False),
        sa.Column("example_count", sa.BigInteger(), nullable=False),
        sa.Column("example_sum", sa.LargeBinary(), nullable=True),
        *(sa.Column(f"df_{view}", sa.LargeBinary(), nullable=True) for view in VIEWS),
        sa.Column("layer_sum", sa.LargeBinary(), nullable=True),
        sa.Column("layer_sumsq", sa.LargeBinary(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retrieval_stats")),
    )
    op.execute("INSERT INTO retrieval_stats (id, n_docs, example_count) VALUES (1, 0, 0)")

    with op.batch_alter_table("bricks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("is_latest", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.create_index(batch_op.f("ix_bricks_is_latest"), ["is_latest"], unique=False)
    op.execute(
        "UPDATE bricks SET is_latest = (version = (SELECT max(b2.version) FROM bricks b2 WHERE b2.name = bricks.name))"
    )


def downgrade() -> None:
    with op.batch_alter_table("bricks", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_bricks_is_latest"))
        batch_op.drop_column("is_latest")
    op.execute(f"DROP INDEX IF EXISTS ix_hnsw_brick_vectors_{DEFAULT_DIM}")
    with op.batch_alter_table("brick_vectors", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_brick_vectors_model"))
        batch_op.drop_index(batch_op.f("ix_brick_vectors_brick_id"))
    op.drop_table("brick_vectors")
    op.drop_table("brick_lexical")
    op.drop_table("retrieval_stats")
    op.drop_table("index_state")
