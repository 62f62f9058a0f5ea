"""kill -9 during load loses no acknowledged inspection: every 201 is found after a restart; a failed
frame write or a lost race leaves no file that no row references.

The service runs as `pvqc serve` in a subprocess (uvicorn) on 127.0.0.1 and a free port, with the
tiny model and its own var/ folder; clients post modules from threads until the process is killed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy.orm import Session, sessionmaker

from serving.cli import wait_until_ready
from serving.db import make_engine, upgrade_head
from serving.store import FrameStore, StagedFrame, insert_inspection, sha256_hex
from tests.serving.conftest import free_port
from tests.serving.helpers import ADMIN_KEY, AUTH, BRIGHT, DARK, inspection_row, module_frame, png

ROOT = Path(__file__).resolve().parents[2]


def start_service(var_dir: Path, model_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    env.update(
        PVQC_MODEL_DIR=str(model_dir),
        PVQC_VAR_DIR=str(var_dir),
        PVQC_LINES=json.dumps({"L1": {"rows": 6, "cols": 10}}),
        PVQC_MAX_WAIT_MS="2",
        PVQC_BOOTSTRAP_ADMIN_KEY=ADMIN_KEY,
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pvqc",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    wait_until_ready(process, base, timeout=60)
    return process, base


@pytest.mark.slow
def test_kill_9_loses_no_acknowledged_inspection(tmp_path: Path, tiny_model: Path) -> None:
    bodies = []
    for i in range(4):
        levels = np.full((6, 10), BRIGHT)
        levels[i, i] = DARK
        bodies.append(png(module_frame(levels)))
    acknowledged: list[tuple[int, str, str]] = []  # (inspection id, serial, frame sha256)
    stop = threading.Event()
    process, base = start_service(tmp_path / "var", tiny_model)

    def post_until_killed(worker: int) -> None:
        with httpx.Client(base_url=base, timeout=10, headers=AUTH) as client:
            n = 0
            while not stop.is_set():
                n += 1
                body = bodies[n % len(bodies)]
                headers = {
                    "Content-Type": "image/png",
                    "X-Module-Serial": f"w{worker}-{n}",
                    "X-Frame-Id": "1",
                }
                try:
                    response = client.post("/lines/L1/modules", content=body, headers=headers)
                except httpx.HTTPError:
                    return  # the service died mid-request: that one was never acknowledged
                if response.status_code == 201:
                    acknowledged.append(
                        (response.json()["inspection_id"], f"w{worker}-{n}", hashlib.sha256(body).hexdigest())
                    )

    workers = [threading.Thread(target=post_until_killed, args=(w,)) for w in range(4)]
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 20
        while len(acknowledged) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)  # mid-load: requests are in flight right now
        process.wait(timeout=10)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=15)
        if process.poll() is None:
            process.kill()
    assert len(acknowledged) >= 20, "the load never got going"

    process, base = start_service(tmp_path / "var", tiny_model)
    try:
        with httpx.Client(base_url=base, timeout=10, headers=AUTH) as client:
            for inspection_id, serial, digest in acknowledged:
                stored = client.get(f"/inspections/{inspection_id}")
                assert stored.status_code == 200, f"acknowledged inspection {inspection_id} lost"
                assert stored.json()["serial"] == serial and len(stored.json()["cells"]) == 60
                frame = client.get(f"/inspections/{inspection_id}/frame")
                assert hashlib.sha256(frame.content).hexdigest() == digest
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.parametrize("failing", ["fsync", "rename"])
def test_a_failed_frame_write_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    store = FrameStore(tmp_path / "frames")

    def disk_full(*_args: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    if failing == "fsync":
        monkeypatch.setattr(os, "fsync", disk_full)
    else:
        monkeypatch.setattr(Path, "replace", disk_full)
    with pytest.raises(OSError, match="No space left"):  # the caller still learns why
        store.stage(b"frame bytes", sha256_hex(b"frame bytes"), "png").publish()
    monkeypatch.undo()
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == []  # no orphan .tmp file


def test_a_twin_that_loses_the_race_leaves_no_file(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(database_url)
    try:
        upgrade_head(engine)
        sessions = sessionmaker(engine, expire_on_commit=False)
        store = FrameStore(tmp_path / "frames")
        shared, winning, losing = b"another module's frame", b"the winner's frame", b"the loser's frame"
        insert_inspection(
            sessions, inspection_row("S2", shared), store.stage(shared, sha256_hex(shared), "png")
        )
        outcomes = race_twins(sessions, store, winning, losing, monkeypatch)
        assert outcomes == {"winner": (sha256_hex(winning), True), "loser": (sha256_hex(winning), False)}
        on_disk = {p.name for p in store.root.rglob("*") if p.is_file()}
        # the winner's and the other module's frames stay; the loser's staged file is gone
        assert on_disk == {f"{sha256_hex(data)}.png" for data in (shared, winning)}
    finally:
        engine.dispose()  # PostgreSQL: the fixture drops the tables next


def race_twins(
    sessions: sessionmaker[Session],
    store: FrameStore,
    winning: bytes,
    losing: bytes,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, tuple[str, bool] | BaseException]:
    """Insert twins of (L1, S1, 1): the loser starts once the winner has published its frame and
    before it commits. Returns each one's (stored frame sha256, created) or exception."""
    published, release = threading.Event(), threading.Event()
    publish = StagedFrame.publish

    def publish_then_wait(frame: StagedFrame) -> Path:
        path = publish(frame)
        if path.name.startswith(sha256_hex(winning)):
            published.set()
            release.wait(timeout=30)
        return path

    monkeypatch.setattr(StagedFrame, "publish", publish_then_wait)
    outcomes: dict[str, tuple[str, bool] | BaseException] = {}

    def insert(name: str, data: bytes) -> None:
        try:
            row, created = insert_inspection(
                sessions, inspection_row("S1", data), store.stage(data, sha256_hex(data), "png")
            )
            outcomes[name] = (row.frame_sha256, created)
        except BaseException as exc:  # the caller's assertion names it
            outcomes[name] = exc

    winner = threading.Thread(target=insert, args=("winner", winning))
    loser = threading.Thread(target=insert, args=("loser", losing))
    try:
        winner.start()
        assert published.wait(timeout=30), f"the winner never published its frame: {outcomes}"
        loser.start()
        loser.join(timeout=0.5)
        # the winner's flushed INSERT holds the twin's key (PostgreSQL) or the write lock (SQLite)
        assert loser.is_alive(), f"the loser did not wait for the winner's commit: {outcomes}"
    finally:
        release.set()
        winner.join(timeout=30)
        loser.join(timeout=60)
    return outcomes
