"""shadow results: a candidate model's scores on live frames, beside the active model's

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "shadow_results",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", Id, sa.ForeignKey("inspections.id", ondelete="CASCADE"), nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("disagrees", sa.Boolean, nullable=False),
        sa.Column("n_disagreeing_cells", sa.Integer, nullable=False),
        sa.Column("cells", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("inspection_id", "model_version", name="uq_shadow_results_inspection_version"),
    )
    op.create_index("ix_shadow_results_disagrees", "shadow_results", ["disagrees", "inspection_id"])


def downgrade() -> None:
    op.drop_index("ix_shadow_results_disagrees", "shadow_results")
    op.drop_table("shadow_results")
