"""result confidence and uncertainty on jobs

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-05 10:00:00

A job's result gains the calibrated probability of its label (`confidence`), whether the answering
version was calibrated, its uncertainty and the `uncertain` flag. Jobs finished before stay null: their
view derives `confidence` from their probabilities and says `calibrated: false`.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("confidence", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("calibrated", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("uncertainty", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("uncertain", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("uncertain")
        batch_op.drop_column("uncertainty")
        batch_op.drop_column("calibrated")
        batch_op.drop_column("confidence")
