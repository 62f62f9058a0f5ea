"""geometry notes: how many modules the frame showed and what the geometry said about them

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable: rows stored before this revision never recorded them, and must not claim "none"
    with op.batch_alter_table("inspections") as batch:
        batch.add_column(sa.Column("modules_in_view", sa.Integer, nullable=True))
        batch.add_column(sa.Column("geometry_notes", sa.JSON, nullable=True))


def downgrade() -> None:
    # recreate="never": SQLite (3.35 and later) drops a column in place. Alembic's default copies the
    # table and drops the old one, and with foreign keys on that DROP TABLE deletes every cell and
    # shadow result, or fails on the review decisions that point at the inspections.
    with op.batch_alter_table("inspections", recreate="never") as batch:
        batch.drop_column("geometry_notes")
        batch.drop_column("modules_in_view")
