"""study batches, results and deliveries

Revision ID: 0006
Revises: 0004
Create Date: 2026-11-23 04:03:49.235302

Only new columns on `batches`: independent of other branches' tables.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_instance_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("accession_number", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("source", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("open_study_key", sa.String(length=300), nullable=True))
        batch_op.add_column(sa.Column("last_instance_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("stable_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("callback_url", sa.String(length=2048), nullable=True))
        batch_op.add_column(sa.Column("callback_secret", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("result_pending", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("report_key", sa.String(length=256), nullable=True))
        batch_op.add_column(sa.Column("report_sop_instance_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("deliveries", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("delivery_due_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_batches_open_study_key", ["open_study_key"], unique=True)
        batch_op.create_index("ix_batches_result_pending", ["result_pending"], unique=False)
        batch_op.create_index("ix_batches_delivery_due_at", ["delivery_due_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index("ix_batches_delivery_due_at")
        batch_op.drop_index("ix_batches_result_pending")
        batch_op.drop_index("ix_batches_open_study_key")
        for column in (
            "delivery_due_at",
            "deliveries",
            "report_sop_instance_uid",
            "report_key",
            "completed_at",
            "result_pending",
            "callback_secret",
            "callback_url",
            "stable_at",
            "last_instance_at",
            "open_study_key",
            "source",
            "accession_number",
            "study_instance_uid",
        ):
            batch_op.drop_column(column)
