"""job explanations (Grad-CAM heatmaps)

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-12 10:00:00

A job may carry an explanation of its answer: asked for at submission (`explain=true`) or later
(`POST /v1/jobs/{id}/explanation`), computed once by a worker. `explanation_status` is null (never
asked), pending, succeeded or failed; `explanation` records the stored heatmap's keys, the target layer
and the answering version, or the failure's code. Jobs made before have neither: never asked.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("explanation_status", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("explanation", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("explanation")
        batch_op.drop_column("explanation_status")
