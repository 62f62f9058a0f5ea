"""frame retention: when the retention policy deleted an inspection's frame file

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

UNPRUNED = "frame_pruned_at IS NULL"


def upgrade() -> None:
    # nullable: every row stored so far still has its frame
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("frame_pruned_at", sa.DateTime(timezone=True), nullable=True))
    # the retention pass looks for old PASS rows still holding a frame; pruned rows pile up forever,
    # so a partial index leaves them out (both databases support WHERE on an index)
    op.create_index(
        "ix_inspections_unpruned_verdict_created",
        "inspections",
        ["verdict", "created_at"],
        postgresql_where=sa.text(UNPRUNED),
        sqlite_where=sa.text(UNPRUNED),
    )


def downgrade() -> None:
    # the rows keep their verdicts; a pruned frame then reads as "no longer stored" (410) without the
    # reason. recreate="never": see 0004, a rebuilt table's DROP would take the cells and decisions along
    op.drop_index("ix_inspections_unpruned_verdict_created", "inspections")
    with op.batch_alter_table("inspections", recreate="never") as batch:
        batch.drop_column("frame_pruned_at")
