"""Live events: line snapshots and alarms, the SSE stream (ids, Last-Event-ID, keep-alive, limits,
a line key's own line), 50 screens under 5 modules/s, and the Redis broker between replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest.mock import patch

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.settings import LineConfig
from serving.snapshots import line_snapshot
from tests.serving.conftest import MakeSettings, serve_in_thread
from tests.serving.helpers import AUTH, BRIGHT, DARK, module_frame, png

REDIS_URL = os.environ.get("PVQC_TEST_REDIS", "redis://127.0.0.1:6379/0")

L1_PASS = png(module_frame(np.full((6, 10), BRIGHT)))
_fail = np.full((6, 10), BRIGHT)
_fail[2, 3] = DARK
L1_FAIL = png(module_frame(_fail))
L2_PASS = png(module_frame(np.full((6, 24), BRIGHT)))


def post(client: httpx.Client | TestClient, line: str, serial: str, body: bytes) -> None:
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    response = client.post(f"/lines/{line}/modules", content=body, headers=headers)
    assert response.status_code == 201, response.text


def live_settings(make_settings: MakeSettings, **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "lines": {
            "L1": LineConfig(rows=6, cols=10, pass_rate_floor=0.9, takt_seconds=60),
            "L2": LineConfig(rows=6, cols=24, pass_rate_floor=0.9, takt_seconds=60),
        },
        "events_min_interval_seconds": 0.05,
        "alarm_check_seconds": 0.5,
        "sse_keepalive_seconds": 0.5,
    }
    values.update(overrides)
    return make_settings(**values)


# -- snapshots ------------------------------------------------------------------------------------


def test_snapshot_windows_failed_cells_and_alarms(make_settings: MakeSettings) -> None:
    settings = live_settings(make_settings)
    with TestClient(create_app(settings), headers=AUTH) as client:
        for i in range(9):
            post(client, "L1", f"P{i}", L1_PASS)
        sessions = client.app.state.services.sessions  # type: ignore[attr-defined]
        now = datetime.now(UTC)
        calm = line_snapshot(sessions, settings, "L1", now)
        assert calm["windows"]["last"] == {
            "modules": 9,
            "counts": {"PASS": 9, "REVIEW": 0, "FAIL": 0},
            "pass_rate": 1.0,
        }
        assert calm["alarm"] == {"state": "ok", "reasons": []} and calm["failed"] == []
        assert sum(p["modules"] for p in calm["trend"]) == 9

        post(client, "L1", "F1", L1_FAIL)  # 9 of 10 = 0.9: at the floor, not below it
        post(client, "L1", "F2", L1_FAIL)  # 9 of 11 < 0.9: alarm
        low = line_snapshot(sessions, settings, "L1", datetime.now(UTC))
        assert low["alarm"]["state"] == "alarm"
        assert [r["kind"] for r in low["alarm"]["reasons"]] == ["low_pass_rate"]
        assert low["windows"]["shift"]["counts"]["FAIL"] == 2 and low["reviews_pending"] == 2
        assert [f["serial"] for f in low["failed"]] == ["F2", "F1"]
        assert [(c["row"], c["col"]) for c in low["failed"][0]["defective"]] == [(2, 3)]
        assert len(low["failed"][0]["defective"][0]["polygon"]) == 4

        later = line_snapshot(sessions, settings, "L1", datetime.now(UTC) + timedelta(seconds=61))
        assert "no_frames" in [r["kind"] for r in later["alarm"]["reasons"]]
        idle = line_snapshot(sessions, settings, "L2", datetime.now(UTC))
        assert idle["alarm"]["state"] == "idle" and idle["windows"]["last"]["pass_rate"] is None


def test_snapshot_on_both_databases(client: TestClient) -> None:
    """The trend's time buckets are the one dialect-specific query: run it on SQLite and PostgreSQL."""
    from sqlalchemy import update

    from serving.db import Inspection
    from serving.settings import shift_start

    for serial, body in (("P1", L1_PASS), ("F1", L1_FAIL), ("P2", L1_PASS)):
        post(client, "L1", serial, body)
    services = client.app.state.services  # type: ignore[attr-defined]
    settings = services.settings
    now = datetime.now(UTC)
    bucket = timedelta(minutes=settings.trend_bucket_minutes)
    start = shift_start(settings.lines["L1"], now, settings.zone)
    # two modules seconds apart in the shift's first bucket, one in its second bucket
    placed = {"P1": start + timedelta(seconds=1), "F1": start + timedelta(seconds=7), "P2": start + bucket}
    with services.sessions() as session:
        for serial, at in placed.items():
            session.execute(update(Inspection).where(Inspection.serial == serial).values(created_at=at))
        session.commit()
    snapshot = line_snapshot(services.sessions, settings, "L1", now)
    assert snapshot["windows"]["shift"]["counts"] == {"PASS": 2, "REVIEW": 0, "FAIL": 1}
    assert [(p["modules"], p["pass_rate"]) for p in snapshot["trend"]] == [(2, 0.5), (1, 1.0)]
    first = datetime.fromisoformat(snapshot["trend"][0]["t"])  # buckets are aligned to the epoch
    assert first <= start < first + bucket
    assert snapshot["reviews_pending"] == 1


def test_an_idle_line_is_idle_whatever_its_last_shift_s_pass_rate(make_settings: MakeSettings) -> None:
    """A line stopped overnight after a bad run: no alarm until it works again this shift."""
    from sqlalchemy import update

    from serving.db import Inspection

    settings = live_settings(make_settings)
    with TestClient(create_app(settings), headers=AUTH) as client:
        for i in range(8):
            post(client, "L1", f"P{i}", L1_PASS)
        for i in range(2):
            post(client, "L1", f"F{i}", L1_FAIL)  # 8 of 10 = 0.8: below the floor of 0.9
        services = client.app.state.services  # type: ignore[attr-defined]
        now = datetime.now(UTC)
        shift = datetime.fromisoformat(line_snapshot(services.sessions, settings, "L1", now)["shift_start"])
        with services.sessions() as session:  # all of it in the shift before this one
            session.execute(update(Inspection).values(created_at=shift - timedelta(hours=1)))
            session.commit()
        idle = line_snapshot(services.sessions, settings, "L1", now)
        assert idle["windows"]["last"]["pass_rate"] == 0.8
        assert idle["alarm"] == {"state": "idle", "reasons": []}

        post(client, "L1", "P9", L1_PASS)  # the line works again: 9 of 11 is still below the floor
        working = line_snapshot(services.sessions, settings, "L1", datetime.now(UTC))
        assert working["alarm"]["state"] == "alarm"
        assert [r["kind"] for r in working["alarm"]["reasons"]] == ["low_pass_rate"]


# -- the stream -----------------------------------------------------------------------------------


class SseReader:
    """Reads one /events stream in a thread: events as dicts, keep-alive comments counted."""

    def __init__(self, base: str, headers: dict[str, str], last_event_id: str | None = None) -> None:
        self.events: list[dict[str, Any]] = []
        self.comments = 0
        self.status: int | None = None
        self._stop = threading.Event()
        self.ended = threading.Event()  # the service closed the stream
        self._headers = dict(headers)
        if last_event_id is not None:
            self._headers["Last-Event-ID"] = last_event_id
        self._thread = threading.Thread(target=self._read, args=(base,), daemon=True)
        self._thread.start()

    def _read(self, base: str) -> None:
        try:
            self._read_stream(base)
        except httpx.HTTPError:
            pass  # a read timeout: the test decides what that means
        else:
            self.ended.set()

    def _read_stream(self, base: str) -> None:
        timeout = httpx.Timeout(10, read=2)
        with (
            httpx.Client(base_url=base, timeout=timeout) as client,
            client.stream("GET", "/events", headers=self._headers) as response,
        ):
            self.status = response.status_code
            if response.status_code != 200:
                return
            fields: dict[str, str] = {}
            for line in response.iter_lines():
                if self._stop.is_set():
                    return
                if line.startswith(":"):
                    self.comments += 1
                elif line == "":
                    if "data" in fields:
                        self.events.append({"id": int(fields["id"]), **json.loads(fields["data"])})
                    fields = {}
                else:
                    name, _, value = line.partition(": ")
                    fields[name] = value

    def latest(self, line_id: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e["line_id"] == line_id), None)

    def wait_for(self, check: Any, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@pytest.fixture
def live(make_settings: MakeSettings) -> Iterator[tuple[str, Any]]:
    settings = live_settings(make_settings, sse_max_clients=3)
    app = create_app(settings)
    with serve_in_thread(settings, app) as address:
        yield f"http://{address}", app


def test_stream_updates_resumes_and_keeps_alive(live: tuple[str, Any]) -> None:
    base, _app = live
    reader = SseReader(base, AUTH)
    try:
        assert reader.wait_for(lambda: reader.latest("L1") and reader.latest("L2"), 5), "no initial snapshots"
        with httpx.Client(base_url=base, headers=AUTH, timeout=10) as client:
            posted = time.monotonic()
            post(client, "L1", "S1", L1_PASS)
            assert reader.wait_for(
                lambda: reader.latest("L1")["windows"]["last"]["modules"] == 1,  # type: ignore[index]
                2,
            ), "the stream did not show the new module within 2 s"
            assert time.monotonic() - posted < 2
            seen = reader.events[-1]["id"]
            assert reader.wait_for(lambda: reader.comments >= 1, 3), "no keep-alive comment"
            ids = [e["id"] for e in reader.events]
            assert ids == sorted(ids) and len(set(ids)) == len(ids)

            post(client, "L1", "S2", L1_FAIL)
            post(client, "L2", "W1", L2_PASS)
            assert reader.wait_for(
                lambda: reader.latest("L2")["windows"]["last"]["modules"] == 1,  # type: ignore[index]
                3,
            )
    finally:
        reader.close()
    # a screen that lost its connection after event `seen` gets what came after it, nothing older
    resumed = SseReader(base, AUTH, last_event_id=str(seen))
    try:
        assert resumed.wait_for(lambda: resumed.latest("L2") is not None, 3)
        assert all(e["id"] > seen for e in resumed.events)
        assert resumed.latest("L1")["windows"]["last"]["modules"] == 2  # type: ignore[index]
    finally:
        resumed.close()
    fresh = SseReader(base, AUTH, last_event_id="123456789")  # unknown id: the latest state whole
    try:
        assert fresh.wait_for(lambda: fresh.latest("L1") and fresh.latest("L2"), 3)
    finally:
        fresh.close()


def test_line_key_stream_and_client_limit(live: tuple[str, Any]) -> None:
    base, app = live
    with httpx.Client(base_url=base, headers=AUTH, timeout=10) as client:
        made = client.post("/keys", json={"name": "line-2", "role": "line", "line_id": "L2"}).json()
    line_reader = SseReader(base, {"Authorization": f"Bearer {made['key']}"})
    others = [SseReader(base, AUTH) for _ in range(2)]
    try:
        assert line_reader.wait_for(lambda: line_reader.latest("L2") is not None, 5)
        hub = app.state.services.live
        assert line_reader.wait_for(lambda: len(hub.clients) == 3, 5)
        refused = SseReader(base, AUTH)  # the limit is 3
        assert refused.wait_for(lambda: refused.status == 503, 5)
        with httpx.Client(base_url=base, headers=AUTH, timeout=10) as client:
            post(client, "L1", "S1", L1_PASS)
        assert others[0].wait_for(
            lambda: others[0].latest("L1")["windows"]["last"]["modules"] == 1,  # type: ignore[index]
            3,
        )
        assert {e["line_id"] for e in line_reader.events} == {"L2"}
    finally:
        for reader in [line_reader, *others]:
            reader.close()
    # closed screens are noticed and leave the hub (at the latest at the next keep-alive)
    assert line_reader.wait_for(lambda: len(app.state.services.live.clients) == 0, 8)


# -- the client limit under a burst of connects -----------------------------------------------------


class GatedStreams:
    """Stands in for the route's `sse_stream`: every stream's body waits for `gate` before it starts.

    A real burst answers its requests and starts their bodies in whatever order the server's tasks
    run; holding every body back until the test has all the statuses makes that the worst order,
    every time: all requests answered before any stream registers with the hub."""

    def __init__(self, real: Callable[..., AsyncGenerator[bytes, None]]) -> None:
        self.real = real
        self.gate = threading.Event()  # set from the test's thread, read on the server's loop

    def __call__(self, *args: Any, **kwargs: Any) -> AsyncGenerator[bytes, None]:
        return self._held(args, kwargs)

    async def _held(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> AsyncGenerator[bytes, None]:
        while not self.gate.is_set():
            await asyncio.sleep(0.01)
        # closed with this one: a cancelled wrapper must not leave the real stream to the collector
        async with contextlib.aclosing(self.real(*args, **kwargs)) as stream:
            async for chunk in stream:
                yield chunk


@pytest.fixture
def gated_live(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Any, GatedStreams]]:
    """A service with room for two live streams whose bodies wait for the test's gate."""
    import serving.routes.events as events_route

    gated = GatedStreams(events_route.sse_stream)
    monkeypatch.setattr(events_route, "sse_stream", gated)
    settings = live_settings(make_settings, sse_max_clients=2)
    app = create_app(settings)
    with serve_in_thread(settings, app) as address:
        yield f"http://{address}", app.state.services.live, gated


async def _connect(
    client: httpx.AsyncClient, held: contextlib.AsyncExitStack, count: int
) -> list[httpx.Response]:
    """`count` /events requests at once, each kept open on `held` (a 503 too, until read)."""
    opening = (held.enter_async_context(client.stream("GET", "/events")) for _ in range(count))
    return list(await asyncio.gather(*opening))


async def _first_line_id(response: httpx.Response) -> str:
    """The line of the first event a stream sends: the stream works, it did not fail after its 200."""
    async with asyncio.timeout(5):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                return str(json.loads(line.removeprefix("data: "))["line_id"])
    raise AssertionError("the stream ended before its first event")


async def _until(check: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def _assert_refused(response: httpx.Response, body: bytes) -> None:
    assert response.headers["Retry-After"] == "5"
    error = json.loads(body)["error"]
    assert "at most 2" in error and "retry later" in error, error


def test_a_burst_of_connects_past_the_limit_gets_503_not_a_broken_stream(
    gated_live: tuple[str, Any, GatedStreams],
) -> None:
    """Six screens connect at once with room for two: exactly two streams and four clean 503s, even when
    every request is answered before any stream's body runs; the closed streams give their places back."""
    base, hub, gated = gated_live

    async def run() -> None:
        limits = httpx.Limits(max_connections=10)
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10, limits=limits) as client:
            async with contextlib.AsyncExitStack() as held:
                responses = await _connect(client, held, 6)
                assert sorted(r.status_code for r in responses) == [200, 200, 503, 503, 503, 503]
                for refused in (r for r in responses if r.status_code == 503):
                    _assert_refused(refused, await refused.aread())
                # the two places were taken when the requests were admitted, before any body ran
                assert len(hub.clients) + hub.reserved == 2
                gated.gate.set()
                for admitted in (r for r in responses if r.status_code == 200):
                    assert await _first_line_id(admitted) in {"L1", "L2"}
            # the streams closed: the server hears the disconnects and the places are free again
            assert await _until(lambda: not hub.clients and hub.reserved == 0, 5), (
                "a closed stream kept its place"
            )
            async with contextlib.AsyncExitStack() as held:
                again = await _connect(client, held, 3)
                assert sorted(r.status_code for r in again) == [200, 200, 503]
                for admitted in (r for r in again if r.status_code == 200):
                    assert await _first_line_id(admitted) in {"L1", "L2"}

    asyncio.run(run())


def test_streams_closed_before_their_body_began_free_their_places_without_the_collector(
    gated_live: tuple[str, Any, GatedStreams],
) -> None:
    """Two screens admitted and gone before their streams started: the response that held each place
    gives it back when it ends, not whenever the garbage collector gets to the unstarted stream."""
    import gc

    base, hub, gated = gated_live

    async def run() -> None:
        async with httpx.AsyncClient(base_url=base, headers=AUTH, timeout=10) as client:
            async with contextlib.AsyncExitStack() as held:
                responses = await _connect(client, held, 2)
                assert [r.status_code for r in responses] == [200, 200]
                assert hub.reserved == 2 and not hub.clients  # admitted, held back before their bodies
            assert await _until(lambda: hub.reserved == 0, 5), "a place stayed taken until a collection"
            gated.gate.set()
            async with contextlib.AsyncExitStack() as held:
                again = await _connect(client, held, 2)
                assert [r.status_code for r in again] == [200, 200]

    gc.disable()  # a cyclic collection would free the places whatever the service does
    try:
        asyncio.run(run())
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "last_event_id",
    [b"\xb2", b"1" * 5000],  # latin-1 superscript two: isdigit() but not int(); past int's digit limit
    ids=["superscript-two", "5000-digits"],
)
def test_an_unreadable_last_event_id_is_ignored(live: tuple[str, Any], last_event_id: bytes) -> None:
    base, _app = live
    headers = {**AUTH, "Last-Event-ID": last_event_id}
    with (
        httpx.Client(base_url=base, timeout=httpx.Timeout(10, read=5)) as client,
        client.stream("GET", "/events", headers=headers) as response,
    ):
        assert response.status_code == 200, response.read()
        # as with no Last-Event-ID: the stream starts with the latest snapshot of a line
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    assert json.loads(first.removeprefix("data: "))["line_id"] in {"L1", "L2"}


def test_a_silent_line_raises_the_takt_alarm_on_the_stream(make_settings: MakeSettings) -> None:
    """No frame for longer than the takt: the periodic check pushes the alarm without any post."""
    settings = live_settings(
        make_settings,
        # long enough that the post which clears the alarm is seen before the next takt runs out,
        # even on a loaded machine
        lines={"L1": LineConfig(rows=6, cols=10, takt_seconds=1.5)},
        alarm_check_seconds=0.2,
    )
    with serve_in_thread(settings) as address:
        base = f"http://{address}"
        reader = SseReader(base, AUTH)
        try:
            with httpx.Client(base_url=base, headers=AUTH, timeout=10) as client:
                post(client, "L1", "S1", L1_PASS)

            def alarmed() -> bool:
                latest = reader.latest("L1")
                return latest is not None and "no_frames" in [r["kind"] for r in latest["alarm"]["reasons"]]

            assert reader.wait_for(alarmed, 6), "the takt alarm never reached the stream"
            seen = len(reader.events)
            with httpx.Client(base_url=base, headers=AUTH, timeout=10) as client:
                post(
                    client, "L1", "S2", L1_PASS
                )  # the line runs again: the alarm clears (until the next takt)
            assert reader.wait_for(
                lambda: any(
                    e["line_id"] == "L1" and e["alarm"]["state"] == "ok" for e in reader.events[seen:]
                ),
                3,
            )
        finally:
            reader.close()


def test_a_revoked_key_s_stream_ends(make_settings: MakeSettings) -> None:
    # the key was checked when the stream opened; a stream lasts for days on a shop-floor screen
    settings = live_settings(make_settings, sse_keepalive_seconds=0.5, auth_cache_seconds=0.5)
    with serve_in_thread(settings) as address:
        base = f"http://{address}"
        with httpx.Client(base_url=base, headers=AUTH, timeout=10) as admin:
            made = admin.post("/keys", json={"name": "screen-1", "role": "line", "line_id": "L1"}).json()
            reader = SseReader(base, {"Authorization": f"Bearer {made['key']}"})
            try:
                assert reader.wait_for(lambda: reader.status == 200 and reader.comments > 0, 5)
                assert not reader.ended.is_set()
                admin.post(f"/keys/{made['id']}/revoke").raise_for_status()
                # within the key cache's time and one check period (at most the keep-alive)
                assert reader.ended.wait(4), "the revoked key's stream stayed open"
            finally:
                reader.close()


@pytest.mark.slow
def test_fifty_screens_at_five_modules_per_second(make_settings: MakeSettings) -> None:
    """Every screen sees every line reach the true final counts, ids in order, nobody resynced."""
    settings = live_settings(make_settings, sse_keepalive_seconds=2.0)
    app = create_app(settings)
    screens, seconds, rate = 50, 6, 5
    with serve_in_thread(settings, app) as address:
        base = f"http://{address}"
        results = asyncio.run(_screens_under_load(base, screens, seconds, rate))
        hub = app.state.services.live
        deadline = time.monotonic() + 8
        while hub.clients and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not hub.clients, f"{len(hub.clients)} closed screens still counted"
        assert hub.resyncs == 0, "a screen fell behind and had to be resynced"
    posted = results["posted"]
    assert posted["L1"] + posted["L2"] == seconds * rate
    truth = results["truth"]
    for index, events in enumerate(results["events"]):
        ids = [e["id"] for e in events]
        assert ids == sorted(ids) and len(ids) == len(set(ids)), f"screen {index}: ids out of order"
        for line in ("L1", "L2"):
            last = next(e for e in reversed(events) if e["line_id"] == line)
            assert last["windows"]["shift"] == truth[line], f"screen {index} ends wrong on {line}"
    # the live events reached every screen alike: same ids after the first snapshot
    tails = {tuple(e["id"] for e in events if e["id"] > results["start_id"]) for events in results["events"]}
    assert len(tails) == 1


async def _screens_under_load(base: str, screens: int, seconds: int, rate: int) -> dict[str, Any]:
    events: list[list[dict[str, Any]]] = [[] for _ in range(screens)]
    limits = httpx.Limits(max_connections=screens + 10)
    async with httpx.AsyncClient(
        base_url=base, headers=AUTH, timeout=httpx.Timeout(30), limits=limits
    ) as client:

        async def screen(index: int, ready: asyncio.Event) -> None:
            async with client.stream("GET", "/events") as response:
                assert response.status_code == 200
                fields: dict[str, str] = {}
                async for line in response.aiter_lines():
                    if line == "":
                        if "data" in fields:
                            events[index].append({"id": int(fields["id"]), **json.loads(fields["data"])})
                            if len({e["line_id"] for e in events[index]}) == 2:
                                ready.set()
                        fields = {}
                    elif not line.startswith(":"):
                        name, _, value = line.partition(": ")
                        fields[name] = value

        readies = [asyncio.Event() for _ in range(screens)]
        tasks = [asyncio.create_task(screen(i, readies[i])) for i in range(screens)]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 20)
        start_id = max(e["id"] for stream in events for e in stream)
        posted = {"L1": 0, "L2": 0}
        begin = time.monotonic()
        for n in range(seconds * rate):
            line = "L1" if n % 3 else "L2"
            body = (L1_FAIL if n % 4 == 0 else L1_PASS) if line == "L1" else L2_PASS
            headers = {"Content-Type": "image/png", "X-Module-Serial": f"m{n}", "X-Frame-Id": "1"}
            response = await client.post(f"/lines/{line}/modules", content=body, headers=headers)
            assert response.status_code == 201
            posted[line] += 1
            await asyncio.sleep(max(0.0, begin + (n + 1) / rate - time.monotonic()))  # 5 per second
        truth = {}
        for line in ("L1", "L2"):
            stats = (await client.get(f"/lines/{line}/stats", params={"window": "shift"})).json()
            truth[line] = {
                "modules": stats["modules"],
                "counts": stats["counts"],
                "pass_rate": stats["pass_rate"],
            }

        def settled() -> bool:
            for stream in events:
                for line in ("L1", "L2"):
                    last = next((e for e in reversed(stream) if e["line_id"] == line), None)
                    if last is None or last["windows"]["shift"]["modules"] != truth[line]["modules"]:
                        return False
            return True

        deadline = time.monotonic() + 10
        while not settled() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {"events": events, "posted": posted, "truth": truth, "start_id": start_id}


# -- Redis: every replica's stream sees every line --------------------------------------------------


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        problem = f"Redis not reachable at {REDIS_URL}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{problem} (CI=true: Redis tests must run, not skip)")
        pytest.skip(problem)
    prefix = f"pvqc-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}:*"):
        client.delete(key)
    client.close()


@pytest.mark.redis
def test_redis_broker_carries_events_between_replicas(make_settings: MakeSettings, redis_prefix: str) -> None:
    settings = live_settings(
        make_settings, broker_url=REDIS_URL, broker_prefix=redis_prefix, alarm_check_seconds=60
    )
    # two replicas on one store, as behind a Kubernetes Service
    with (
        TestClient(create_app(settings), headers=AUTH) as first,
        TestClient(create_app(settings), headers=AUTH) as second,
    ):
        post(first, "L1", "S1", L1_PASS)
        hub = second.app.state.services.live  # type: ignore[attr-defined]
        first_hub = first.app.state.services.live  # type: ignore[attr-defined]

        def sees_it(live: Any) -> bool:
            latest = live.latest.get("L1")
            return latest is not None and latest.payload["windows"]["last"]["modules"] == 1

        # each replica hears the event through its own Redis subscription, the first one included: in CI
        # the second heard it while the first still held the event before it
        deadline = time.monotonic() + 5
        while not (sees_it(hub) and sees_it(first_hub)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sees_it(hub), "the second replica never heard the first one's inspection"
        assert sees_it(first_hub), "the first replica never heard its own inspection back"
        # ids come from one Redis counter: both replicas name the same event the same way
        assert first_hub.latest["L1"].id == hub.latest["L1"].id


# -- Redis: each distinct snapshot of a line goes out once across replicas ---------------------------


class HeldDeliveries:
    """Stands between a replica's broker and its hub: while held, events wait as if still on the wire,
    so the replica computes a change before it hears another replica's event of it (in production, the
    usual case when the periodic checks of two replicas run at about the same time)."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.waiting: list[tuple[int, dict[str, Any]]] | None = None

    def deliver(self, event_id: int, payload: dict[str, Any]) -> None:
        if self.waiting is None:
            self.hub.deliver(event_id, payload)
        else:
            self.waiting.append((event_id, payload))

    def hold(self) -> None:
        self.waiting = []

    def release(self) -> None:
        waiting, self.waiting = self.waiting or [], None
        for event_id, payload in waiting:
            self.hub.deliver(event_id, payload)


class Replicas:
    """Hubs on one Redis prefix, as N replicas of the service; their refreshers do not run: the test
    calls `refresh` itself. Every replica computes L1's snapshot from `state` (time passing, no post)."""

    def __init__(self, make_settings: MakeSettings, prefix: str) -> None:
        self.settings = live_settings(make_settings, alarm_check_seconds=60)
        self.prefix = prefix
        self.state: dict[str, Any] = {"alarm": "ok"}
        self.hubs: list[Any] = []
        self.held: list[HeldDeliveries] = []
        self.sentinels = 0

    def _compute(self, lines: list[str], now: datetime) -> list[dict[str, Any]]:
        return [{"line_id": line_id, **self.state} for line_id in lines]

    async def add(self) -> Any:
        from serving.live import LiveEvents, RedisBroker

        hub = LiveEvents(self.settings, None, RedisBroker(REDIS_URL, self.prefix))  # type: ignore[arg-type]
        hub._compute = self._compute  # type: ignore[method-assign]
        held = HeldDeliveries(hub)
        await hub.broker.start(held.deliver, hub.resend_all)
        self.hubs.append(hub)
        self.held.append(held)
        return hub

    async def change_seen_by_all(self, **state: Any) -> None:
        """Every replica computes the new snapshot before it hears any replica's event of it."""
        self.state.update(state)
        for held in self.held:
            held.hold()
        for hub in self.hubs:
            await hub.refresh(["L1"])
        for held in self.held:
            held.release()

    async def settle(self) -> None:
        """Wait until every event published so far has reached every hub: one channel keeps its order,
        so a marker published last arrives after all of them."""
        self.sentinels += 1
        marker = {"line_id": "L2", "marker": self.sentinels}
        await self.hubs[0].broker.publish(marker)
        arrived = await _until(
            lambda: all(hub.latest.get("L2") and hub.latest["L2"].payload == marker for hub in self.hubs), 5
        )
        assert arrived, "an event published to Redis did not reach every replica"

    async def stop(self) -> None:
        for hub in self.hubs:
            await hub.stop()


def _drain(client: Any) -> list[tuple[int, str]]:
    """The L1 events queued for a client so far: (id, alarm)."""
    events = []
    while not client.queue.empty():
        event = client.queue.get_nowait()
        events.append((event.id, event.payload["alarm"]))
    return events


@pytest.mark.redis
@pytest.mark.parametrize("alarms", [["alarm"], ["alarm", "ok", "alarm"]], ids=["one-change", "A-B-A"])
def test_replicas_publish_a_time_driven_change_once(
    make_settings: MakeSettings, redis_prefix: str, alarms: list[str]
) -> None:
    """Two replicas compute the same change (the takt ran out: no post) before either hears the other:
    each screen gets it once, whichever replica it is connected to. A line that goes back to an earlier
    state is published again: only the last published snapshot is skipped, not every one seen."""

    async def run() -> None:
        replicas = Replicas(make_settings, redis_prefix)
        try:
            first, second = await replicas.add(), await replicas.add()
            await first.refresh(["L1"])  # the line's state before: heard by both
            await replicas.settle()
            screens = [first.connect("L1"), second.connect("L1")]
            for alarm in alarms:
                await replicas.change_seen_by_all(alarm=alarm)
                await replicas.settle()
            seen = [_drain(screen) for screen in screens]
            assert [alarm for _id, alarm in seen[0]] == alarms, "a change went out more than once, or never"
            assert seen[1] == seen[0], "the replicas' screens were told different events"
            assert len({event.id for event in second.recent}) == len(second.recent), "an id twice in replay"
            # the record of what went out last expires: a stale one cannot silence a line for good
            ttl = await first.broker.client.pttl(f"{redis_prefix}:last-snapshot:L1")
            assert 0 < ttl <= 60_000
        finally:
            await replicas.stop()

    asyncio.run(run())


@pytest.mark.redis
def test_a_resend_after_an_outage_and_a_new_replica_publish_what_went_out_already(
    make_settings: MakeSettings, redis_prefix: str
) -> None:
    """The dedupe never costs a screen its state: a replica that missed events (its broker subscribed
    again after an outage and calls `resend_all`) publishes every line even though Redis records that
    snapshot as sent, and so does a replica that starts after it went out (its screens never got it)."""

    async def run() -> None:
        replicas = Replicas(make_settings, redis_prefix)
        try:
            first, second = await replicas.add(), await replicas.add()
            await first.refresh(["L1"])
            await replicas.settle()
            screen = first.connect("L1")
            await replicas.change_seen_by_all(alarm="alarm")
            await replicas.settle()
            changes = _drain(screen)
            assert len(changes) == 1, f"the change went out {len(changes)} times, not once"
            [(changed, _alarm)] = changes

            second.resend_all()  # what its broker calls after subscribing again
            await second.refresh(["L1"])
            await replicas.settle()
            resends = _drain(screen)
            assert len(resends) == 1, "the resend after an outage was skipped"
            [(resent, alarm)] = resends
            assert resent > changed and alarm == "alarm"

            third = await replicas.add()  # a replica started now: nothing of L1 has reached it
            await third.refresh(["L1"])
            await replicas.settle()
            latest = third.latest.get("L1")
            assert latest and latest.payload["alarm"] == "alarm", "a new replica's screens lack the line"
            assert len(_drain(screen)) == 1
        finally:
            await replicas.stop()

    asyncio.run(run())


def test_stop_waits_for_the_snapshot_query_in_flight(make_settings: MakeSettings) -> None:
    # a query still running after the service stopped held table locks and deadlocked the
    # PostgreSQL tests' DROP TABLE; stop() must return only once it has finished
    from serving.live import InProcessBroker, LiveEvents

    started, finished = threading.Event(), threading.Event()

    class SlowLive(LiveEvents):
        def _compute(self, lines: list[str], now: datetime) -> list[dict[str, Any]]:
            started.set()
            time.sleep(0.5)
            finished.set()
            return []

    async def run() -> bool:
        live = SlowLive(make_settings(), None, InProcessBroker())  # type: ignore[arg-type]
        await live.start()
        while not started.is_set():  # the first pass computes every line at once
            await asyncio.sleep(0.01)
        await live.stop()
        return finished.is_set()

    assert asyncio.run(run()) is True


# -- the hub: failed publishes, each event once, a reset event counter, a Redis outage ---------------


async def _never_disconnected() -> bool:
    return False


async def _stream_ids(stream: Any, wait: float = 0.3) -> list[int]:
    """The ids of the events a stream sends until it has been quiet for `wait` seconds (which ends it)."""
    ids = []
    while True:
        try:
            frame = await asyncio.wait_for(anext(stream), wait)
        except TimeoutError:
            return ids
        if frame.startswith(b"id: "):
            ids.append(int(frame.split(b"\n", 1)[0].removeprefix(b"id: ")))


async def _next_id(stream: Any) -> int:
    """The id of the next event a stream sends (the stream goes on)."""
    async with asyncio.timeout(2):
        while not (frame := await anext(stream)).startswith(b"id: "):
            pass
    return int(frame.split(b"\n", 1)[0].removeprefix(b"id: "))


def _fixed_snapshots(lines: list[str], now: datetime) -> list[dict[str, Any]]:
    return [{"line_id": line_id, "alarm": {"state": "idle", "reasons": []}} for line_id in lines]


def test_a_failed_publish_is_published_again(make_settings: MakeSettings) -> None:
    """An idle line's snapshot that failed to go out is not taken for sent: the retry publishes it."""
    from serving.live import InProcessBroker, LiveEvents

    class BlippingBroker(InProcessBroker):
        failures = 1

        async def publish(self, payload: dict[str, Any], *, force: bool = False) -> None:
            if self.failures:
                self.failures -= 1
                raise ConnectionError("the broker blipped")
            await super().publish(payload, force=force)

    async def run() -> set[str]:
        # no periodic pass within the test: only the retry of the failed refresh can publish
        settings = make_settings(alarm_check_seconds=60, events_min_interval_seconds=0.0)
        hub = LiveEvents(settings, None, BlippingBroker())  # type: ignore[arg-type]
        hub._compute = _fixed_snapshots  # type: ignore[method-assign]
        await hub.start()
        try:
            deadline = time.monotonic() + 5
            while len(hub.latest) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert hub.health()["status"] == "ok"  # a failed publish is a hiccup, not a stream that is down
        finally:
            await hub.stop()
        assert hub.health()["status"] == "down"
        return set(hub.latest)

    assert asyncio.run(run()) == {"L1", "L2"}


def test_health_says_down_once_refreshes_keep_failing_and_ok_when_they_work_again(
    make_settings: MakeSettings,
) -> None:
    # e.g. a Redis that refuses the publishing script: the subscription is up, yet nothing goes out
    from serving.live import InProcessBroker, LiveEvents

    class RefusingBroker(InProcessBroker):
        refusals = 3

        async def publish(self, payload: dict[str, Any], *, force: bool = False) -> None:
            if self.refusals:
                self.refusals -= 1
                raise ConnectionError("NOSCRIPT scripting is disabled")
            await super().publish(payload, force=force)

    async def run() -> tuple[list[str], str]:
        settings = make_settings(alarm_check_seconds=60, events_min_interval_seconds=0.0)
        hub = LiveEvents(settings, None, RefusingBroker())  # type: ignore[arg-type]
        hub._compute = _fixed_snapshots  # type: ignore[method-assign]
        seen: list[str] = []
        with patch("serving.live.REFRESH_RETRY_MAX_SECONDS", 0.05):
            await hub.start()
            try:
                deadline = time.monotonic() + 5
                while len(hub.latest) < 2 and time.monotonic() < deadline:
                    status = hub.health()
                    if not seen or seen[-1] != status["status"]:
                        seen.append(str(status["status"]))
                        if status["status"] == "down":
                            reason = str(status["reason"])
                    await asyncio.sleep(0.005)
                seen.append(str(hub.health()["status"]))
            finally:
                await hub.stop()
        return seen, reason

    seen, reason = asyncio.run(run())
    assert seen[0] == "ok" and "down" in seen and seen[-1] == "ok", seen
    assert "snapshot refreshes failed" in reason


def test_a_stream_sends_each_event_once_on_connect_and_on_resume(make_settings: MakeSettings) -> None:
    """An event arriving while the stream's first bytes are written is sent once, not in both the
    catch-up and the queue."""
    from serving.live import InProcessBroker, LiveEvents, sse_stream

    async def run(last_event_id: int | None) -> list[int]:
        hub = LiveEvents(make_settings(), None, InProcessBroker())  # type: ignore[arg-type]
        await hub.broker.start(hub.deliver)
        await hub.broker.publish({"line_id": "L1", "n": 1})
        await hub.broker.publish({"line_id": "L2", "n": 2})
        stream = sse_stream(hub, None, last_event_id, 15.0, _never_disconnected)
        assert (await anext(stream)).startswith(b"retry: ")  # registered; suspended at its first yield
        await hub.broker.publish({"line_id": "L1", "n": 3})
        ids = await _stream_ids(stream)
        await stream.aclose()
        assert not hub.clients
        return ids

    assert asyncio.run(run(None)) == [1, 2, 3]
    assert asyncio.run(run(1)) == [2, 3]


def test_after_the_event_counter_resets_the_newest_arrival_is_the_latest(make_settings: MakeSettings) -> None:
    """Redis restarted without persistence: ids start again at 1, and screens must follow them."""
    from serving.live import InProcessBroker, LiveEvents, sse_stream

    async def ids_and_latest(hub: LiveEvents, last_event_id: int | None) -> tuple[list[int], Any]:
        stream = sse_stream(hub, None, last_event_id, 15.0, _never_disconnected)
        ids = await _stream_ids(stream)
        await stream.aclose()
        return ids, {line_id: e.payload["n"] for line_id, e in hub.latest.items()}

    async def run() -> None:
        hub = LiveEvents(make_settings(), None, InProcessBroker())  # type: ignore[arg-type]
        hub.deliver(4999, {"line_id": "L2", "n": "before"})
        hub.deliver(5000, {"line_id": "L1", "n": "before"})
        hub.deliver(1, {"line_id": "L1", "n": "after"})  # the counter was reset
        assert hub.latest["L1"].payload["n"] == "after"
        # a new screen, and one whose last id is above the counter: the latest state, newest last
        # (so the browser's next Last-Event-ID is the newest id)
        assert await ids_and_latest(hub, None) == ([4999, 1], {"L1": "after", "L2": "before"})
        assert (await ids_and_latest(hub, 5000))[0] == [4999, 1]
        hub.deliver(2, {"line_id": "L2", "n": "after"})
        # a screen that saw the new event 1 resumes after it
        assert (await ids_and_latest(hub, 1))[0] == [2]

        # a connected screen keeps getting events when the ids go backwards
        hub.deliver(3, {"line_id": "L1", "n": "again"})
        stream = sse_stream(hub, "L1", None, 15.0, _never_disconnected)
        assert await _next_id(stream) == 3
        hub.deliver(1, {"line_id": "L1", "n": "reset twice"})
        assert await _next_id(stream) == 1
        await stream.aclose()

    asyncio.run(run())


@pytest.mark.redis
def test_the_redis_reader_outlives_an_outage_and_resends_every_line(
    make_settings: MakeSettings, redis_prefix: str
) -> None:
    """Redis goes away for longer than redis-py retries: the reader waits, subscribes again, and every
    line's snapshot is sent again (events published meanwhile were missed)."""
    import redis.exceptions

    from serving.live import LiveEvents, RedisBroker

    health_in_outage: list[dict[str, object]] = []
    gone: dict[str, Any] = {}

    async def run() -> None:
        broker = RedisBroker(REDIS_URL, redis_prefix)
        broker.reconnect_first_seconds = 0.05  # the first retry at once: the test waits for it
        settings = make_settings(alarm_check_seconds=60, events_min_interval_seconds=0.0)
        hub = LiveEvents(settings, None, broker)  # type: ignore[arg-type]
        hub._compute = _fixed_snapshots  # type: ignore[method-assign]
        made: list[Any] = []
        real_pubsub = broker.client.pubsub

        def flaky_pubsub(**kwargs: Any) -> Any:
            pubsub = real_pubsub(**kwargs)
            made.append(pubsub)
            if len(made) == 1:  # Redis goes away once the first snapshot has arrived
                real_get = pubsub.get_message

                async def get_message(**kw: Any) -> Any:
                    if "latest" in gone:
                        raise redis.exceptions.ConnectionError(
                            "Error 111 connecting to redis. Connection refused."
                        )
                    message = await real_get(**kw)
                    if message is not None and message.get("type") == "message":
                        gone["latest"] = None
                    return message

                pubsub.get_message = get_message
            elif len(made) == 2:  # and is still away at the first attempt to subscribe again

                async def subscribe(*args: Any, **kw: Any) -> None:
                    health_in_outage.append(hub.health())
                    raise redis.exceptions.ConnectionError(
                        "Error 111 connecting to redis. Connection refused."
                    )

                pubsub.subscribe = subscribe
            return pubsub

        broker.client.pubsub = flaky_pubsub  # type: ignore[method-assign]
        await hub.start()
        try:
            deadline = time.monotonic() + 5
            while "latest" not in gone and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert "latest" in gone, "the first snapshot never arrived"
            await asyncio.sleep(0.05)
            before = {line_id: event.id for line_id, event in hub.latest.items()}

            def resent() -> bool:
                return all(
                    line_id in hub.latest and hub.latest[line_id].id > before.get(line_id, 0)
                    for line_id in ("L1", "L2")
                )

            deadline = time.monotonic() + 5
            while not resent() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert resent(), "the screens never heard from Redis again after the outage"
            assert health_in_outage and health_in_outage[0]["status"] == "down"
            assert hub.health()["status"] == "ok"
        finally:
            await hub.stop()

    asyncio.run(run())


def test_a_failed_key_check_keeps_the_stream_and_a_refusal_ends_it(make_settings: MakeSettings) -> None:
    """The stream asks again whether its key is valid; a database blip is no answer."""
    from serving.live import InProcessBroker, LiveEvents, sse_stream

    answers = iter([RuntimeError("database unreachable"), True, False])

    async def allowed() -> bool:
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def run() -> list[bytes]:
        hub = LiveEvents(make_settings(), None, InProcessBroker())  # type: ignore[arg-type]
        # keep-alive 0.1 s: the key is asked again every 0.1 s
        stream = sse_stream(hub, None, None, 0.1, _never_disconnected, allowed)
        frames = []
        async with asyncio.timeout(5):
            async for frame in stream:  # ends when the key is refused
                frames.append(frame)
        assert not hub.clients
        return frames

    frames = asyncio.run(run())
    # the failed check and the good one each let a keep-alive through; the refusal ended the stream
    assert frames[0].startswith(b"retry: ") and frames.count(b": keep-alive\n\n") == 2


def test_admitted_streams_count_against_the_limit_before_their_body_starts(
    make_settings: MakeSettings,
) -> None:
    """The 200 goes out before a stream's body runs, too late to refuse it: the limit is taken at
    admission, and a stream dropped before it started gives its place back."""
    import gc

    from serving.live import (
        InProcessBroker,
        LiveEvents,
        TooManyClientsError,
        release_when_dropped,
        sse_stream,
    )

    async def run() -> None:
        hub = LiveEvents(make_settings(sse_max_clients=2), None, InProcessBroker())  # type: ignore[arg-type]
        first, second = hub.reserve(), hub.reserve()
        with pytest.raises(TooManyClientsError):
            hub.reserve()  # two admitted, neither started: the third is refused now, not after its 200
        started = sse_stream(hub, None, None, 15.0, _never_disconnected, reservation=first)
        assert (await anext(started)).startswith(b"retry: ")
        assert len(hub.clients) == 1 and hub.reserved == 1  # the place moved from reserved to connected
        dropped = sse_stream(hub, None, None, 15.0, _never_disconnected, reservation=second)
        release_when_dropped(dropped, second)  # as the route ties it
        del dropped  # the client went away before its body began: no `finally` ever runs
        gc.collect()
        await asyncio.sleep(0)  # the release is handed to the loop
        assert hub.reserved == 0
        third = hub.reserve()  # its place is free again
        third.release()
        await started.aclose()
        assert not hub.clients and hub.reserved == 0

    asyncio.run(run())


def test_end_stream_frees_the_place_of_a_stream_started_or_not_exactly_once(
    make_settings: MakeSettings,
) -> None:
    """What the /events response runs when it ends: a stream left suspended at a `yield` (its send was
    cancelled) leaves the hub at once, an unstarted one gives its reserved place back, and ending either
    again changes no count."""
    from serving.live import InProcessBroker, LiveEvents, TooManyClientsError, end_stream, sse_stream

    async def run() -> None:
        hub = LiveEvents(make_settings(sse_max_clients=2), None, InProcessBroker())  # type: ignore[arg-type]
        first, second = hub.reserve(), hub.reserve()
        started = sse_stream(hub, None, None, 15.0, _never_disconnected, reservation=first)
        assert (await anext(started)).startswith(b"retry: ")  # suspended at its first yield
        unstarted = sse_stream(hub, None, None, 15.0, _never_disconnected, reservation=second)
        assert len(hub.clients) == 1 and hub.reserved == 1
        await end_stream(started, first)
        await end_stream(unstarted, second)
        assert not hub.clients and hub.reserved == 0
        await end_stream(started, first)
        await end_stream(unstarted, second)
        assert not hub.clients and hub.reserved == 0
        both = [hub.reserve(), hub.reserve()]  # both places are free again, and no more than both
        with pytest.raises(TooManyClientsError, match="at most 2 streams"):
            hub.reserve()
        for reservation in both:
            reservation.release()

    asyncio.run(run())
