"""Alembic environment: migrations run on the connection `serving.db.upgrade_head` hands over,
or, from the `alembic` command line, on `PVQC_DATABASE_URL` / the settings' default URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from serving.db import Base, make_engine

target_metadata = Base.metadata


def run_on(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite cannot ALTER most things
    )
    with context.begin_transaction():
        context.run_migrations()


def run() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_on(connection)
        return
    from serving.settings import Settings

    engine = make_engine(Settings().resolved_database_url)
    with engine.begin() as own:
        run_on(own)


run()
