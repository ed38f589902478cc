"""model ownership: a `models` table (owner, held-out evaluation set), who activated a version, whose
models a training run may register into

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-24 10:00:00

Existing names get the organisation of the run that registered their first version as owner; a first
version without a run, or one of the bootstrap admin's or the open mode's, makes the model shared.
Their held-out set is recorded by the next run that registers into them.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The bootstrap admin key's organisation (shared.auth.BOOTSTRAP_ORGANISATION): its models are shared.
BOOTSTRAP_ORGANISATION = "admin"


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("owner", sa.String(length=128), nullable=True),
        sa.Column("evaluation_set", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_models_owner"), ["owner"], unique=False)
    with op.batch_alter_table("model_activations", schema=None) as batch_op:
        batch_op.add_column(sa.Column("actor_key_id", sa.String(length=36), nullable=True))
        batch_op.add_column(sa.Column("actor_organisation", sa.String(length=128), nullable=True))
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_scope", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("api_key_id", sa.String(length=36), nullable=True))

    op.execute(
        sa.text(
            """
            INSERT INTO models (name, owner, evaluation_set, created_at)
            SELECT mv.name,
                   CASE WHEN tr.organisation = :bootstrap THEN NULL ELSE tr.organisation END,
                   NULL,
                   mv.created_at
            FROM model_versions mv LEFT JOIN training_runs tr ON tr.id = mv.training_run_id
            WHERE mv.version = (SELECT MIN(first.version) FROM model_versions first WHERE first.name = mv.name)
            """
        ).bindparams(bootstrap=BOOTSTRAP_ORGANISATION)
    )
    # Runs still queued keep to their organisation's models (admins' runs cannot be told apart any more).
    op.execute(
        sa.text(
            "UPDATE training_runs SET model_scope = organisation "
            "WHERE organisation IS NOT NULL AND organisation <> :bootstrap"
        ).bindparams(bootstrap=BOOTSTRAP_ORGANISATION)
    )


def downgrade() -> None:
    with op.batch_alter_table("training_runs", schema=None) as batch_op:
        batch_op.drop_column("api_key_id")
        batch_op.drop_column("model_scope")
    with op.batch_alter_table("model_activations", schema=None) as batch_op:
        batch_op.drop_column("actor_organisation")
        batch_op.drop_column("actor_key_id")
    with op.batch_alter_table("models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_models_owner"))
    op.drop_table("models")
