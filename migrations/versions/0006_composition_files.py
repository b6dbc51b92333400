"""compositions published to the blob store keep their manifest

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 08:00:00

``compositions.files``: for a composition published to object storage, the list of its
files (path, sha256 of the blob, size), written in the transaction that marks it ready.
NULL for one in the local compositions directory.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("compositions") as batch:
        batch.add_column(sa.Column("files", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("compositions") as batch:
        batch.drop_column("files")
