"""inspections and their cells

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "inspections",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("line_id", sa.String(64), nullable=False),
        sa.Column("serial", sa.String(128), nullable=False),
        sa.Column("frame_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(500), nullable=True),
        sa.Column("rows", sa.Integer, nullable=False),
        sa.Column("cols", sa.Integer, nullable=False),
        sa.Column("n_defective", sa.Integer, nullable=False),
        sa.Column("n_uncertain", sa.Integer, nullable=False),
        sa.Column("model_name", sa.String(128), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("review_threshold", sa.Float, nullable=False),
        sa.Column("frame_sha256", sa.String(64), nullable=False),
        sa.Column("frame_content_type", sa.String(32), nullable=False),
        sa.Column("frame_width", sa.Integer, nullable=False),
        sa.Column("frame_height", sa.Integer, nullable=False),
        sa.Column("geometry_ok", sa.Boolean, nullable=False),
        sa.Column("geometry_confidence", sa.Float, nullable=True),
        sa.Column("timings_ms", sa.JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("line_id", "serial", "frame_id", name="uq_inspections_line_serial_frame"),
    )
    op.create_index("ix_inspections_line_created", "inspections", ["line_id", "created_at"])
    op.create_index("ix_inspections_verdict_created", "inspections", ["verdict", "created_at"])
    op.create_index("ix_inspections_frame_sha256", "inspections", ["frame_sha256"])
    op.create_table(
        "inspection_cells",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column(
            "inspection_id",
            Id,
            sa.ForeignKey("inspections.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("row", sa.Integer, nullable=False),
        sa.Column("col", sa.Integer, nullable=False),
        sa.Column("probability", sa.Float, nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("polygon", sa.JSON, nullable=True),
    )
    op.create_index("ix_inspection_cells_inspection_id", "inspection_cells", ["inspection_id"])


def downgrade() -> None:
    op.drop_index("ix_inspection_cells_inspection_id", "inspection_cells")
    op.drop_table("inspection_cells")
    op.drop_index("ix_inspections_frame_sha256", "inspections")
    op.drop_index("ix_inspections_verdict_created", "inspections")
    op.drop_index("ix_inspections_line_created", "inspections")
    op.drop_table("inspections")
