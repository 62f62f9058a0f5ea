"""The inspection store's tables and engine: SQLAlchemy 2 models, engine set-up, Alembic upgrade.

Owns: the `inspections` and `inspection_cells` tables (an inspection's frame may be pruned by the
retention policy: `frame_pruned_at`), the `api_keys` table, the append-only
`review_decisions` audit table, the `shadow_results` of a shadow model (the migrations in
`serving/migrations` create them; these models must match), how an engine is made durable on
SQLite (WAL + synchronous FULL, so a committed row survives kill -9 and power loss) and
PostgreSQL, and running `upgrade head` at start. The same models serve both databases; only the URL differs.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity
IdType = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both databases (SQLite hands back naive values: they are UTC)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("expected a timezone-aware datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    pass


class Inspection(Base):
    """One accepted frame (module or single cell) and its verdict; written once, never updated, except
    that the frame retention pass (serving/retention.py) stamps `frame_pruned_at` when it deletes the
    frame file: the verdict and cells stay as they were answered."""

    __tablename__ = "inspections"
    __table_args__ = (
        UniqueConstraint("line_id", "serial", "frame_id", name="uq_inspections_line_serial_frame"),
        Index("ix_inspections_line_created", "line_id", "created_at"),
        Index("ix_inspections_verdict_created", "verdict", "created_at"),
        # the retention pass looks for old PASS rows whose frame is still stored; pruned rows pile up
        # forever, so they are left out of this index (migration 0005)
        Index(
            "ix_inspections_unpruned_verdict_created",
            "verdict",
            "created_at",
            postgresql_where=text("frame_pruned_at IS NULL"),
            sqlite_where=text("frame_pruned_at IS NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    line_id: Mapped[str] = mapped_column(String(64))
    serial: Mapped[str] = mapped_column(String(128))
    frame_id: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))  # InspectionKind
    verdict: Mapped[str] = mapped_column(String(16))  # ModuleVerdict
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    rows: Mapped[int] = mapped_column(Integer)
    cols: Mapped[int] = mapped_column(Integer)
    n_defective: Mapped[int] = mapped_column(Integer)
    n_uncertain: Mapped[int] = mapped_column(Integer)
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    threshold: Mapped[float] = mapped_column(Float)
    review_threshold: Mapped[float] = mapped_column(Float)
    frame_sha256: Mapped[str] = mapped_column(String(64), index=True)
    frame_content_type: Mapped[str] = mapped_column(String(32))
    frame_width: Mapped[int] = mapped_column(Integer)
    frame_height: Mapped[int] = mapped_column(Integer)
    geometry_ok: Mapped[bool] = mapped_column(Boolean)
    geometry_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    # module frames: how many modules the frame showed (the largest is judged) and the geometry's notes
    # about it ("2 modules in view; the largest is judged"); None on cell frames and older rows
    modules_in_view: Mapped[int | None] = mapped_column(Integer, nullable=True)
    geometry_notes: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    timings_ms: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # when the retention policy deleted the frame file (serving/retention.py); None: the frame is kept
    frame_pruned_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    cells: Mapped[list[InspectionCell]] = relationship(
        back_populates="inspection", order_by="InspectionCell.position", cascade="all, delete-orphan"
    )


class InspectionCell(Base):
    """One cell's probability and verdict; polygon is its outline in the stored frame's pixels."""

    __tablename__ = "inspection_cells"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # row-major index, for stable ordering
    row: Mapped[int] = mapped_column(Integer)
    col: Mapped[int] = mapped_column(Integer)
    probability: Mapped[float] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String(16))  # model.card.CellVerdict
    polygon: Mapped[list[list[float]] | None] = mapped_column(JSON, nullable=True)

    inspection: Mapped[Inspection] = relationship(back_populates="cells")


class ApiKey(Base):
    """A credential: only the SHA-256 of the key is kept, plus its first characters to recognise it."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)  # who, in the audit trail
    role: Mapped[str] = mapped_column(String(16))  # serving.auth.Role
    line_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # line keys: their line
    prefix: Mapped[str] = mapped_column(String(16))
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    created_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ReviewDecision(Base):
    """One engineer's decision on a module verdict or on one cell's label; rows are never changed.

    `before` is the effective label just before this decision (the model's, or the previous
    decision's `after`), `after` the new one; the latest row per (inspection, target) is the label
    that retraining uses. Database triggers refuse UPDATE and DELETE (migration 0002).
    """

    __tablename__ = "review_decisions"
    __table_args__ = (Index("ix_review_decisions_inspection", "inspection_id", "id"),)

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id"))
    target: Mapped[str] = mapped_column(String(8))  # serving.review.Target: module or cell
    row: Mapped[int | None] = mapped_column(Integer, nullable=True)  # cells only
    col: Mapped[int | None] = mapped_column(Integer, nullable=True)
    before: Mapped[dict[str, Any]] = mapped_column(JSON)
    after: Mapped[dict[str, Any]] = mapped_column(JSON)
    note: Mapped[str | None] = mapped_column(String(2000), nullable=True)
    reviewer: Mapped[str] = mapped_column(String(64))  # the key's name
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class ShadowResult(Base):
    """A shadow (candidate) model's judgement of a stored inspection; it never changed the verdict.

    `cells` holds every cell's shadow probability and verdict; `disagrees` is set when the module
    verdict or any cell's verdict differs from the active model's (the review queue can filter on it).
    """

    __tablename__ = "shadow_results"
    __table_args__ = (
        UniqueConstraint("inspection_id", "model_version", name="uq_shadow_results_inspection_version"),
        Index("ix_shadow_results_disagrees", "disagrees", "inspection_id"),
    )

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    inspection_id: Mapped[int] = mapped_column(ForeignKey("inspections.id", ondelete="CASCADE"))
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))  # ModuleVerdict the shadow would have given
    disagrees: Mapped[bool] = mapped_column(Boolean)
    n_disagreeing_cells: Mapped[int] = mapped_column(Integer)
    cells: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def make_engine(url: str, pool_size: int = 10, max_overflow: int = 10) -> Engine:
    """An engine whose commits are durable; SQLite parent folders are created. `pool_size` +
    `max_overflow` bound one process's PostgreSQL connections (replicas x that must fit the server's
    max_connections)."""
    if url.startswith("sqlite"):
        database = url.split("///", 1)[-1]
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    # READ COMMITTED pinned, whatever the server's default: the frame lock's users (the insert and the
    # retention pass, serving/store.py lock_frame) must see rows committed while they waited for it,
    # which a REPEATABLE READ snapshot taken before the wait would hide
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=max_overflow,
        isolation_level="READ COMMITTED",
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run during a write; synchronous=FULL fsyncs the WAL on every commit, which is
    # what "a response means it is durable" needs; foreign keys are off by default in SQLite.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def schema_behind(engine: Engine) -> str | None:
    """Why `engine`'s database is not at this code's schema (a tool that must not migrate asks), or None.

    A tool run beside the service reads and writes the schema the service migrated to; an older one
    lacks columns it needs, and a newer one belongs to a newer pvqc.
    """
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    if current == head:
        return None
    found = "no pvqc schema" if current is None else f"schema revision {current}"
    return f"the database has {found}, this pvqc needs {head}: start the service once (it migrates) and retry"


def upgrade_head(engine: Engine) -> None:
    """Run Alembic `upgrade head` on `engine`; replicas starting together take turns (PostgreSQL lock)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # a transaction-scoped advisory lock: two replicas never migrate at once
            connection.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
    log.info("database schema at head (%s)", engine.url.render_as_string(hide_password=True))
