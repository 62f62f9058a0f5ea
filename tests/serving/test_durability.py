"""kill -9 during load loses no acknowledged inspection: every 201 is found after a restart.

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

from serving.cli import wait_until_ready
from serving.store import FrameStore, sha256_hex
from tests.serving.conftest import free_port
from tests.serving.helpers import ADMIN_KEY, AUTH, BRIGHT, DARK, module_frame, png

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
        store.save(b"frame bytes", sha256_hex(b"frame bytes"), "png")
    monkeypatch.undo()
    assert [p.name for p in store.root.rglob("*") if p.is_file()] == []  # no orphan .tmp file
