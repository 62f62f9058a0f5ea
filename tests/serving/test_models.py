"""Hot swap and shadow mode: the service follows the registry's active version without a restart,
never mixes models in one onnxruntime call, and a shadow model's disagreements reach the review
queue without changing any verdict."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from model.registry import Registry
from serving.app import create_app
from serving.inference import MicroBatcher, ModelRuntime, load_runtime
from tests.registry_helpers import tiny_version
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, BRIGHT, MID, module_frame, png


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "models" / "pvqc-cell")
    tiny_version(registry.root / "1.0.0", "1.0.0")
    # the same graph with a lower threshold: a mid-grey cell is defective to it, uncertain to 1.0.0
    tiny_version(registry.root / "2.0.0", "2.0.0", threshold=0.3, review=0.2)
    registry.promote("1.0.0")
    return registry


@pytest.fixture
def client(make_settings: MakeSettings, registry: Registry, tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(
        model_dir=tmp_path / "unused", model_registry=registry.root, registry_poll_seconds=60
    )
    with TestClient(create_app(settings), headers=AUTH) as test_client:
        yield test_client


def post(client: TestClient, serial: str, level: int = BRIGHT) -> dict[str, Any]:
    levels = np.full((6, 10), BRIGHT)
    levels[1, 2] = level
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    response = client.post("/lines/L1/modules", content=png(module_frame(levels)), headers=headers)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def test_promotion_and_rollback_switch_the_served_model(client: TestClient, registry: Registry) -> None:
    assert client.get("/models").json()["active"]["version"] == "1.0.0"
    assert post(client, "A")["model"]["version"] == "1.0.0"
    registry.promote("2.0.0", force=True)  # the swap is tested here, not the evaluation
    reloaded = client.post("/models/reload").json()
    assert reloaded["swapped"] and reloaded["active"]["version"] == "2.0.0"
    assert post(client, "B")["model"]["version"] == "2.0.0"
    registry.rollback()
    assert client.post("/models/reload").json()["active"]["version"] == "1.0.0"
    assert post(client, "C")["model"]["version"] == "1.0.0"
    assert client.get("/inspections/1").json()["model"]["version"] == "1.0.0"  # stored as judged


def test_the_registrys_shadow_is_served_from_the_first_request(
    make_settings: MakeSettings, registry: Registry, tmp_path: Path
) -> None:
    # the startup looks at the registry before the first request; polling alone (every 60 s here) could
    # leave the first frames without a shadow verdict, or race a promotion made just after startup
    registry.set_shadow("2.0.0")
    settings = make_settings(
        model_dir=tmp_path / "unused", model_registry=registry.root, registry_poll_seconds=60
    )
    with TestClient(create_app(settings), headers=AUTH) as client:
        served = client.get("/models").json()
        assert served["active"]["version"] == "1.0.0" and served["shadow"]["version"] == "2.0.0"
        registry.promote("2.0.0", force=True)  # after startup: nothing follows it until a poll or reload
        assert client.get("/models").json()["active"]["version"] == "1.0.0"


def test_a_broken_version_keeps_the_current_model_until_it_is_fixed(
    client: TestClient, registry: Registry
) -> None:
    registry.promote("2.0.0", force=True)  # the swap is tested here, not the evaluation
    graph = registry.root / "2.0.0" / "model.onnx"
    good = graph.read_bytes()
    graph.write_bytes(b"not onnx")  # broken after promotion (say, still being copied)
    reloaded = client.post("/models/reload").json()
    assert not reloaded["swapped"] and reloaded["active"]["version"] == "1.0.0"
    assert list(reloaded["load_failures"]) == [str(registry.root / "2.0.0")]
    assert post(client, "A")["model"]["version"] == "1.0.0"
    follower = client.app.state.services.follower  # type: ignore[attr-defined]
    assert client.portal.call(follower.check) is False  # type: ignore[union-attr]  # unchanged: not retried

    graph.write_bytes(good)  # fixed: the next poll tries again, no restart or reload needed
    assert client.portal.call(follower.check) is True  # type: ignore[union-attr]
    served = client.get("/models").json()
    assert served["active"]["version"] == "2.0.0" and served["load_failures"] == {}
    assert post(client, "B")["model"]["version"] == "2.0.0"


def test_replicas_sharing_the_registry_all_follow_it(
    make_settings: MakeSettings, registry: Registry, tmp_path: Path
) -> None:
    # two replicas (own databases here; what they share is the registry folder), each polling it
    replicas = [
        make_settings(model_registry=registry.root, registry_poll_seconds=0.1, var_dir=tmp_path / f"var{i}")
        for i in range(2)
    ]
    with (
        TestClient(create_app(replicas[0]), headers=AUTH) as one,
        TestClient(create_app(replicas[1]), headers=AUTH) as two,
    ):
        assert post(one, "A")["model"]["version"] == post(two, "A")["model"]["version"] == "1.0.0"
        registry.promote("2.0.0", force=True)  # the swap is tested here, not the evaluation
        deadline = time.monotonic() + 10
        for client in (one, two):
            while client.get("/models").json()["active"]["version"] != "2.0.0":
                assert time.monotonic() < deadline, "a replica did not follow the registry"
                time.sleep(0.05)
        assert post(one, "B")["model"]["version"] == post(two, "B")["model"]["version"] == "2.0.0"


def test_the_shadow_never_changes_a_verdict_and_its_disagreements_are_queued(
    client: TestClient, registry: Registry
) -> None:
    registry.set_shadow("2.0.0")
    assert client.post("/models/reload").json()["shadow"]["version"] == "2.0.0"
    stored = post(client, "S1", MID)
    assert stored["verdict"] == "REVIEW" and stored["model"]["version"] == "1.0.0"
    deadline = time.monotonic() + 10
    while True:
        page = client.get("/review/queue", params={"shadow_disagrees": True, "state": "all"}).json()
        if page["items"]:
            break
        assert time.monotonic() < deadline, "no shadow result was stored"
        time.sleep(0.05)
    (item,) = page["items"]
    assert item["inspection_id"] == stored["inspection_id"] and item["verdict"] == "REVIEW"
    assert item["shadow"] == {
        "model_version": "2.0.0",
        "verdict": "FAIL",
        "disagrees": True,
        "disagreeing_cells": [[1, 2]],
    }
    assert client.get(f"/inspections/{stored['inspection_id']}").json()["verdict"] == "REVIEW"
    agreeing = client.get("/review/queue", params={"shadow_disagrees": False, "state": "all"}).json()
    assert stored["inspection_id"] not in [i["inspection_id"] for i in agreeing["items"]]


class CountingSession:
    """Stands in for an InferenceSession: answers a constant and records each call's batch size."""

    def __init__(self, value: float) -> None:
        self.value, self.calls = value, []

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        self.calls.append(n)
        return [np.full(n, self.value, np.float32), np.zeros((n, 4, 4), np.float32)]


def test_a_batch_never_mixes_two_models(tiny_model: Path) -> None:
    base = load_runtime(tiny_model, "fp32", 1)
    sessions = CountingSession(0.25), CountingSession(0.75)
    runtimes: list[ModelRuntime] = [replace(base, session=s) for s in sessions]  # type: ignore[arg-type]
    batcher = MicroBatcher(runtimes[0], max_batch=64, max_wait_ms=20, max_queue_cells=10_000)
    batcher.start()
    try:

        async def many() -> list[tuple[int, dict[str, np.ndarray]]]:
            cells = np.zeros((3, 1, 32, 32), np.uint8)
            jobs = [batcher.infer(cells, runtimes[i % 2]) for i in range(20)]
            return list(enumerate(await asyncio.gather(*jobs)))

        results = asyncio.run(many())
    finally:
        batcher.stop()
    for i, outputs in results:
        assert np.all(outputs["probability"] == sessions[i % 2].value)
    assert sum(sessions[0].calls) == sum(sessions[1].calls) == 30


def test_shutdown_waits_for_the_shadow_row_being_written(
    make_settings: MakeSettings, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the shadow's row is written in a worker thread that cancelling cannot stop: shutdown must let it
    # finish before the engine is disposed (a PostgreSQL test's teardown would otherwise drop the
    # tables under it)
    import serving.app
    import serving.shadow

    events: list[str] = []
    real_store, real_stop = serving.shadow.store_shadow, serving.app.stop_services

    def slow_store(*args: Any) -> None:
        events.append("storing")
        time.sleep(0.5)
        real_store(*args)
        events.append("stored")

    def recording_stop(services: Any) -> None:
        events.append("stopped")
        real_stop(services)

    monkeypatch.setattr(serving.shadow, "store_shadow", slow_store)
    monkeypatch.setattr(serving.app, "stop_services", recording_stop)
    registry.set_shadow("2.0.0")
    settings = make_settings(model_dir=tmp_path / "unused", model_registry=registry.root)
    with TestClient(create_app(settings), headers=AUTH) as client:
        post(client, "S1", MID)
        deadline = time.monotonic() + 10
        while "storing" not in events:
            assert time.monotonic() < deadline, "the shadow never started storing"
            time.sleep(0.01)
    assert events == ["storing", "stored", "stopped"]


def test_the_shadow_skips_frames_beyond_its_in_flight_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.shadow

    frames_kept: list[bool] = []

    async def slow_scoring(services: Any, shadow: Any, inspection: Any, grey: Any, images: Any) -> None:
        frames_kept.append(grey is not None)
        await asyncio.sleep(0.05)

    monkeypatch.setattr(serving.shadow, "score_in_shadow", slow_scoring)
    services = SimpleNamespace(settings=SimpleNamespace(resolved_frame_workers=1), tasks=set())
    frame, cells = np.zeros((64, 64), np.uint8), [np.zeros((8, 8), np.uint8)]

    async def post_five() -> None:
        for i in range(5):
            same_size = SimpleNamespace(size=8)
            serving.shadow.shadow_later(services, same_size, SimpleNamespace(id=i), frame, cells)  # type: ignore[arg-type]
        assert len(services.tasks) == 2  # two per frame worker; the other three frames were skipped
        await asyncio.gather(*services.tasks)
        serving.shadow.shadow_later(services, SimpleNamespace(size=16), SimpleNamespace(id=9), frame, cells)  # type: ignore[arg-type]
        await asyncio.gather(*services.tasks)

    asyncio.run(post_five())
    # the frame is held only when the shadow must cut its own cells at another size
    assert frames_kept == [False, False, True]
