"""api keys and the append-only review audit trail

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# the audit trail is append-only in the database itself, not only in the API: an UPDATE or DELETE
# from any client (a script, a console) is refused
SQLITE_GUARDS = [
    f"CREATE TRIGGER review_decisions_no_{verb.lower()} BEFORE {verb} ON review_decisions "
    "BEGIN SELECT RAISE(ABORT, 'review_decisions is append-only'); END"
    for verb in ("UPDATE", "DELETE")
]
POSTGRES_GUARDS = [
    """CREATE FUNCTION review_decisions_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'review_decisions is append-only'; END $$""",
    """CREATE TRIGGER review_decisions_append_only BEFORE UPDATE OR DELETE ON review_decisions
    FOR EACH ROW EXECUTE FUNCTION review_decisions_append_only()""",
]


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("line_id", sa.String(64), nullable=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(64), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_table(
        "review_decisions",
        sa.Column("id", Id, primary_key=True, autoincrement=True),
        sa.Column("inspection_id", Id, sa.ForeignKey("inspections.id"), nullable=False),
        sa.Column("target", sa.String(8), nullable=False),
        sa.Column("row", sa.Integer, nullable=True),
        sa.Column("col", sa.Integer, nullable=True),
        sa.Column("before", sa.JSON, nullable=False),
        sa.Column("after", sa.JSON, nullable=False),
        sa.Column("note", sa.String(2000), nullable=True),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_review_decisions_inspection", "review_decisions", ["inspection_id", "id"])
    op.create_index("ix_review_decisions_created_at", "review_decisions", ["created_at"])
    guards = POSTGRES_GUARDS if op.get_bind().dialect.name == "postgresql" else SQLITE_GUARDS
    for statement in guards:
        op.execute(statement)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER IF EXISTS review_decisions_append_only ON review_decisions")
        op.execute("DROP FUNCTION IF EXISTS review_decisions_append_only()")
    op.drop_index("ix_review_decisions_created_at", "review_decisions")
    op.drop_index("ix_review_decisions_inspection", "review_decisions")
    op.drop_table("review_decisions")
    op.drop_table("api_keys")
