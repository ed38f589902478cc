"""training run checkpoints and resumes

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 00:00:00

A training run checkpoints each epoch to the object store (`training-runs/<id>/checkpoint.pt`) and
continues from it when its trainer is lost or hands it back. `checkpoint_epoch` is the last epoch
checkpointed (null: none yet); `resumes` counts the times the reconciler requeued the run after losing
its trainer (bounded by XRAYQ_RUN_MAX_RESUMES); `handbacks` the times a stopping trainer (SIGTERM, a
redeploy) gave it back. Runs made before have neither checkpoint nor resumes.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("checkpoint_epoch", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("resumes", sa.Integer(), nullable=False, server_default="0"))
        batch_op.add_column(sa.Column("handbacks", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("handbacks")
        batch_op.drop_column("resumes")
        batch_op.drop_column("checkpoint_epoch")
