"""SR destinations of each organisation

Revision ID: 0007
Revises: 0006

A table of its own: where each organisation's Structured Reports go by C-STORE.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sr_destinations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("organisation", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("ae_title", sa.String(length=16), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("organisation", "name", name="uq_sr_destinations_organisation_name"),
    )
    op.create_index("ix_sr_destinations_organisation", "sr_destinations", ["organisation"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_sr_destinations_organisation", table_name="sr_destinations")
    op.drop_table("sr_destinations")
