"""answers served from the result cache

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06 00:40:00

A job whose input bytes (sha256) one model version already answered for the same organisation is
answered with that result (`shared/jobs/result_cache.py`): `cached_from` names the job whose result it
repeats. The index serves the lookup: the same bytes, answered by the same version.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cached_from", sa.String(length=36), nullable=True))
    op.create_index("ix_jobs_input_sha256_model_version", "jobs", ["input_sha256", "model_version_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_input_sha256_model_version", table_name="jobs")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("cached_from")
