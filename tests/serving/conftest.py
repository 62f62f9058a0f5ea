"""Fixtures of the service tests: the tiny model, settings on a temporary var/, an app client,
databases (SQLite always; PostgreSQL on 127.0.0.1:5432 in its own throw-away database), and a
uvicorn server on a free port for clients that need real sockets (tritonclient)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.settings import LineConfig, Settings
from tests.serving.helpers import ADMIN_KEY, AUTH, build_tiny_model

PG_ADMIN_URL = os.environ.get("PVQC_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _postgres_unreachable() -> str | None:
    import psycopg

    try:
        psycopg.connect(PG_ADMIN_URL, connect_timeout=3, autocommit=True).close()
    except psycopg.Error as exc:
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {exc}"
    return None


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this run's own on the shared server, dropped afterwards."""
    import psycopg

    problem = _postgres_unreachable()
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (CI=true: PostgreSQL tests must run, not skip)")
        pytest.skip(problem)
    name = f"pvqc_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each store test runs on both databases; PostgreSQL ones get fresh tables per test."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pvqc.db'}"
        return
    from sqlalchemy import create_engine, text

    url: str = request.getfixturevalue("postgres_url")
    yield url
    engine = create_engine(url)
    with engine.begin() as connection:  # the next test migrates from empty again
        connection.execute(
            text(
                "DROP TABLE IF EXISTS shadow_results, review_decisions, api_keys, inspection_cells, "
                "inspections, alembic_version"
            )
        )
        connection.execute(text("DROP FUNCTION IF EXISTS review_decisions_append_only()"))
    engine.dispose()


MakeSettings = Callable[..., Settings]


@pytest.fixture
def make_settings(tmp_path: Path, tiny_model: Path) -> MakeSettings:
    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_dir": tiny_model,
            "var_dir": tmp_path / "var",
            "lines": {"L1": LineConfig(rows=6, cols=10), "L2": LineConfig(rows=6, cols=24)},
            "max_wait_ms": 2.0,
            # the first-start admin key, known to the tests (the service makes a random one otherwise)
            "bootstrap_admin_key": ADMIN_KEY,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def client(make_settings: MakeSettings, database_url: str) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(database_url=database_url)), headers=AUTH) as test_client:
        yield test_client


@pytest.fixture
def sqlite_client(make_settings: MakeSettings) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings()), headers=AUTH) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def live_server(make_settings: MakeSettings) -> Iterator[str]:
    """The app under uvicorn in a thread, on 127.0.0.1 and a free port; yields 'host:port'."""
    with serve_in_thread(make_settings()) as address:
        yield address


@contextlib.contextmanager
def serve_in_thread(settings: Settings, app: Any = None) -> Iterator[str]:
    """`app` (default: `create_app(settings)`) under uvicorn in a thread on 127.0.0.1; yields 'host:port'."""
    import uvicorn

    port = free_port()
    # open event streams never end by themselves: give them 2 s at shutdown, then close them
    config = uvicorn.Config(
        app or create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
