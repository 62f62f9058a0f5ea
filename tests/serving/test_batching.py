"""Micro-batching: concurrent callers share onnxruntime calls; a full queue sheds with 503."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.inference import MicroBatcher, QueueFullError, load_runtime
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, BRIGHT, TINY_SIZE, module_frame, png


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_requests_share_batches(tiny_model, workers: int) -> None:
    sizes: list[int] = []
    batcher = MicroBatcher(
        load_runtime(tiny_model, "fp32", 1),
        16,
        50.0,
        1000,
        observe=lambda n, _s: sizes.append(n),
        workers=workers,
    )
    batcher.start()

    async def many() -> list[dict[str, np.ndarray]]:
        levels = [np.full((3, 1, TINY_SIZE, TINY_SIZE), 10.0 * i, np.float32) for i in range(10)]
        return await asyncio.gather(*(batcher.infer(x) for x in levels))

    try:
        results = asyncio.run(many())
    finally:
        batcher.stop()
    # every caller gets its own cells back, in order, though they ran in shared batches
    for i, result in enumerate(results):
        np.testing.assert_allclose(result["probability"], [1 - 10.0 * i / 255] * 3, atol=1e-6)
        assert result["cam"].shape == (3, 4, 4)
    assert sum(sizes) == 30 and max(sizes) == 16 and len(sizes) < 10


def test_a_job_split_over_parallel_workers_comes_back_in_order(tiny_model) -> None:
    batcher = MicroBatcher(load_runtime(tiny_model, "fp32", 1), 4, 1.0, 1000, workers=3)
    batcher.start()
    levels = np.arange(37, dtype=np.float32) * 6.0
    cells = np.broadcast_to(levels[:, None, None, None], (37, 1, TINY_SIZE, TINY_SIZE)).copy()

    async def twice() -> list[dict[str, np.ndarray]]:
        return await asyncio.gather(batcher.infer(cells), batcher.infer(cells[::-1].copy()))

    try:
        forward, backward = asyncio.run(twice())
    finally:
        batcher.stop()
    np.testing.assert_allclose(forward["probability"], 1 - levels / 255, atol=1e-6)
    np.testing.assert_allclose(backward["probability"], (1 - levels / 255)[::-1], atol=1e-6)
    assert batcher.pending_cells == 0 and not batcher.running


def test_a_failing_batch_fails_its_callers_and_the_workers_go_on(tiny_model) -> None:
    batcher = MicroBatcher(load_runtime(tiny_model, "fp32", 1), 4, 1.0, 1000, workers=2)
    batcher.start()
    wrong_size = np.zeros((10, 1, TINY_SIZE + 3, TINY_SIZE), np.float32)  # the graph refuses it
    good = np.full((6, 1, TINY_SIZE, TINY_SIZE), 51.0, np.float32)

    try:
        with pytest.raises(Exception, match=r"(?i)dimension|shape|invalid"):
            asyncio.run(batcher.infer(wrong_size))
        # slices of it that other workers hold are still counted until they return
        give_up = time.monotonic() + 10
        while batcher.pending_cells and time.monotonic() < give_up:
            time.sleep(0.01)
        assert batcher.pending_cells == 0 and batcher.running
        served = asyncio.run(batcher.infer(good))
        np.testing.assert_allclose(served["probability"], [0.8] * 6, atol=1e-6)
        assert batcher.pending_cells == 0
    finally:
        batcher.stop()


def test_queue_bound_raises_instead_of_growing(tiny_model) -> None:
    batcher = MicroBatcher(load_runtime(tiny_model, "fp32", 1), 4, 1.0, 8)
    batcher.start()
    try:
        with pytest.raises(QueueFullError, match="limit 8"):
            asyncio.run(batcher.infer(np.zeros((9, 1, TINY_SIZE, TINY_SIZE), np.float32)))
        assert batcher.pending_cells == 0
    finally:
        batcher.stop()


def test_full_queue_answers_503_with_retry_after(make_settings: MakeSettings) -> None:
    with TestClient(create_app(make_settings(retry_after_seconds=3)), headers=AUTH) as client:
        batcher = client.app.state.services.batcher  # type: ignore[attr-defined]
        batcher._pending_cells = batcher.max_queue_cells - 10  # busy: room for 10 model inputs, not 60
        body = png(module_frame(np.full((6, 10), BRIGHT)))
        headers = {"Content-Type": "image/png", "X-Module-Serial": "q", "X-Frame-Id": "1"}
        response = client.post("/lines/L1/modules", content=body, headers=headers)
        assert response.status_code == 503 and response.headers["Retry-After"] == "3"
        assert "queue is full" in response.json()["error"]
        assert client.get("/inspections").json()["items"] == []  # nothing stored for a refused frame
        assert 'pvqc_rejected_requests_total{reason="queue_full"} 1.0' in client.get("/metrics").text


def test_a_frame_larger_than_the_whole_queue_is_413_not_a_retry(make_settings: MakeSettings) -> None:
    with TestClient(create_app(make_settings()), headers=AUTH) as client:
        client.app.state.services.batcher.max_queue_cells = 59  # type: ignore[attr-defined]
        headers = {"Content-Type": "image/png", "X-Module-Serial": "big", "X-Frame-Id": "1"}
        body = png(module_frame(np.full((6, 10), BRIGHT)))
        response = client.post("/lines/L1/modules", content=body, headers=headers)
        assert response.status_code == 413 and "Retry-After" not in response.headers
        assert "(60 cells, two inputs per half cell) is 60 model inputs and the queue holds at most 59" in (
            response.text
        )
        # a half cell is two inputs, known only once cut: refused then, before any inference
        client.app.state.services.batcher.max_queue_cells = 1  # type: ignore[attr-defined]
        half = np.full((32, 64), BRIGHT, np.uint8)
        response = client.post("/lines/L1/cells", content=png(half), headers=headers)
        assert (
            response.status_code == 413
            and "(1 cells, two inputs per half cell) is 2 model inputs" in response.text
        )
        assert client.get("/inspections").json()["items"] == []
        assert 'pvqc_rejected_requests_total{reason="too_large"} 2.0' in client.get("/metrics").text


def test_queue_that_cannot_hold_one_half_cut_module_is_refused_at_start(make_settings: MakeSettings) -> None:
    from pydantic import ValidationError

    lines = {"H": {"rows": 6, "cols": 24}}
    with pytest.raises(ValidationError, match=r"cannot hold one module of line 'H' \(6x24.*expected >= 288"):
        make_settings(lines=lines, max_queue_cells=287)
    assert make_settings(lines=lines, max_queue_cells=288).max_queue_cells == 288


@pytest.mark.parametrize("workers", [1, 2])
def test_frames_are_cut_at_most_frame_workers_at_a_time(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    # decoding and cutting a large frame takes hundreds of MB: a burst of frames must queue for
    # frame_workers threads, not convert all at once in anyio's 40
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import model.geometry

    real_cut = model.geometry.cut_module
    lock, running, most = threading.Lock(), [0], [0]

    def counted_cut(*args, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.1)  # long enough for every request to be waiting at once
            return real_cut(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(model.geometry, "cut_module", counted_cut)
    body = png(module_frame(np.full((6, 10), BRIGHT)))
    with TestClient(create_app(make_settings(frame_workers=workers)), headers=AUTH) as client:

        def post(number: int) -> int:
            headers = {"Content-Type": "image/png", "X-Module-Serial": f"m{number}", "X-Frame-Id": "1"}
            return client.post("/lines/L1/modules", content=body, headers=headers).status_code

        with ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(post, range(6)))
    assert statuses == [201] * 6
    assert most[0] == workers
