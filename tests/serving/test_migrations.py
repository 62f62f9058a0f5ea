"""Schema migrations: the latest revision goes down and up again on both databases without losing a row."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import inspect, text

from serving.app import create_app
from serving.db import make_engine, upgrade_head
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, DARK, downgrade
from tests.serving.test_review import decide, post

TABLES = ("inspections", "inspection_cells", "review_decisions")


def row_counts(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return {
                table: connection.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
                for table in TABLES
            }
    finally:
        engine.dispose()


def stored_reviewed_module(make_settings: MakeSettings, database_url: str) -> dict[str, int]:
    """Post one module and decide it, through the service; the row counts that must survive."""
    with TestClient(create_app(make_settings(database_url=database_url)), headers=AUTH) as client:
        inspection = post(client, "M1", DARK)
        assert decide(client, inspection, {"module": "FAIL"}).status_code == 201
    stored = row_counts(database_url)
    assert stored == {"inspections": 1, "inspection_cells": 60, "review_decisions": 1}
    return stored


def migrate_to_head(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade_head(engine)
    finally:
        engine.dispose()


def test_rolling_back_the_geometry_notes_keeps_every_row(
    make_settings: MakeSettings, database_url: str
) -> None:
    stored = stored_reviewed_module(make_settings, database_url)
    # SQLite rebuilt the table to drop a column, and its DROP TABLE deleted every cell through the
    # foreign keys (or failed on the review decisions' key)
    downgrade(database_url, "0003")
    assert row_counts(database_url) == stored
    migrate_to_head(database_url)
    assert row_counts(database_url) == stored


def test_postgres_connections_per_replica_come_from_settings(make_settings: MakeSettings) -> None:
    # replicas x (pool + overflow) must fit the server's max_connections: the deployment sets them
    settings = make_settings(
        database_url="postgresql+psycopg://pvqc@db.invalid/pvqc", db_pool_size=5, db_max_overflow=3
    )
    engine = make_engine(settings.resolved_database_url, settings.db_pool_size, settings.db_max_overflow)
    try:
        assert engine.pool.size() == 5 and engine.pool._max_overflow == 3  # type: ignore[attr-defined]
    finally:
        engine.dispose()  # never connected: the host does not exist


def columns_and_indexes(url: str, table: str) -> tuple[set[str], set[str]]:
    engine = make_engine(url)
    try:
        found = inspect(engine)
        return {c["name"] for c in found.get_columns(table)}, {i["name"] for i in found.get_indexes(table)}
    finally:
        engine.dispose()


def test_rolling_back_the_frame_retention_column_keeps_every_row(
    make_settings: MakeSettings, database_url: str
) -> None:
    stored = stored_reviewed_module(make_settings, database_url)
    columns, indexes = columns_and_indexes(database_url, "inspections")
    assert "frame_pruned_at" in columns and "ix_inspections_unpruned_verdict_created" in indexes
    downgrade(database_url, "0004")
    assert row_counts(database_url) == stored
    columns, indexes = columns_and_indexes(database_url, "inspections")
    assert "frame_pruned_at" not in columns and "ix_inspections_unpruned_verdict_created" not in indexes
    migrate_to_head(database_url)
    assert row_counts(database_url) == stored
    assert "frame_pruned_at" in columns_and_indexes(database_url, "inspections")[0]
