"""Live events for the shop-floor screen: line snapshots, a broker between replicas, SSE clients.

Owns the path from "an inspection was stored" to every connected screen:
- `LiveEvents.publish` (the app's EventPublisher) only marks the line dirty: the route never waits
  for screens. A refresher task recomputes dirty lines' snapshots (at most every
  `events_min_interval_seconds`, so a burst of frames costs one computation) and every line every
  `alarm_check_seconds` (takt alarms, shift changes, the hour window sliding), and publishes those
  that changed.
- A broker numbers each snapshot and delivers it to every replica: `InProcessBroker` (embedded)
  or `RedisBroker` (pub/sub, ids from one Redis counter, so ids compare across replicas). The
  same code runs both ways; `make_broker` picks by `PVQC_BROKER_URL`. The Redis reader outlives a
  Redis outage: it waits (capped backoff), subscribes again, and has every line re-sent, since
  events published meanwhile never reached this replica. `LiveEvents.health` says whether the
  live stream is up, for /healthz.
- Each distinct snapshot of a line goes out once across replicas: a time-driven change (an alarm,
  the hour window sliding) is computed by every replica at about the same time, each before it
  hears the others'. `RedisBroker.publish` skips a snapshot that Redis records as the line's last
  published one, in one script with the numbering and the publish (no replica can record a
  snapshot it did not send). A hub that has not heard a line since it (re)subscribed (it just
  started, or missed events in an outage) publishes anyway (`force`): the event that went out
  before it listened never reached its screens.
- The hub side (`deliver`, `connect`, `disconnect`) keeps the latest snapshot per line (the one
  that arrived last: ids start again at 1 when Redis restarts without its data) and the last
  `sse_replay_events` events for `Last-Event-ID` resumes, bounds its clients (`sse_max_clients`),
  and gives each a bounded queue: a client too slow to keep up is resynced with the latest
  snapshots instead of growing memory.
- The limit is taken when /events admits a request (`reserve`: check and count in one step, no
  await between), before its 200: a burst of connects past it gets clean 503s, never a 200 whose
  stream then fails. The reservation becomes the client's registration when its stream starts, and
  `end_stream` gives it back when the response ends without starting it.
- `sse_stream` is one client's byte stream, with a keep-alive comment every
  `sse_keepalive_seconds`; each event reaches it once; a disconnect cancels it (or is seen between
  events) and its `finally` unregisters the client; `end_stream` closes it when its response ends,
  so that `finally` runs then even where a cancelled send left it suspended.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import weakref
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import anyio
from sqlalchemy.orm import Session, sessionmaker

from serving.events import InspectionCompleted
from serving.settings import Settings
from serving.snapshots import line_snapshot

log = logging.getLogger(__name__)

EVENT_NAME = "line"
RETRY_MS = 2000  # how soon a browser reconnects after the stream drops
DISCONNECT_CHECK_SECONDS = 5.0
REFRESH_RETRY_MAX_SECONDS = 10.0  # the longest pause between retries of a failing refresh
# refreshes failed in a row from which /healthz reports the live stream down: one is a hiccup (a
# database or broker blip, retried at once), three in a row (about 7 s of retries) is an outage, e.g. a
# Redis that refuses the publishing script
REFRESH_FAILURES_DOWN = 3
SUBSCRIBE_TIMEOUT_SECONDS = 10.0  # a Redis host that drops packets would otherwise hang a (re)subscribe


@dataclass(frozen=True)
class LiveEvent:
    id: int
    line_id: str
    payload: dict[str, Any]
    frame: bytes  # the SSE text, encoded once for every client
    # this replica's arrival number: ids go backwards when Redis's counter is reset, and two
    # replicas' events can arrive out of id order; this one only grows
    arrival: int


def sse_frame(event_id: int, payload: dict[str, Any]) -> bytes:
    data = json.dumps({**payload, "event_id": event_id}, separators=(",", ":"))
    return f"id: {event_id}\nevent: {EVENT_NAME}\ndata: {data}\n\n".encode()


def snapshot_content(payload: dict[str, Any]) -> dict[str, Any]:
    """What a snapshot says, without when it was computed: two replicas' equal snapshots compare equal."""
    return {k: v for k, v in payload.items() if k != "generated_at"}


def content_digest(payload: dict[str, Any]) -> str:
    """The same for equal content whichever replica computed it (keys sorted at every level)."""
    text = json.dumps(snapshot_content(payload), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


Deliver = Callable[[int, dict[str, Any]], None]
Reconnected = Callable[[], None]  # called when the broker hears events again after missing some


def _nothing() -> None:
    pass


class Broker(Protocol):
    connected: bool  # False while events published by any replica may not reach this one

    async def start(self, deliver: Deliver, reconnected: Reconnected = _nothing) -> None: ...
    # force: publish even where this snapshot of the line is known to have gone out last
    async def publish(self, payload: dict[str, Any], *, force: bool = False) -> None: ...
    async def stop(self) -> None: ...


class InProcessBroker:
    """One process: ids from a counter, delivery by a direct call."""

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._next_id = 0
        self.connected = False

    async def start(self, deliver: Deliver, reconnected: Reconnected = _nothing) -> None:
        self._deliver = deliver
        self.connected = True

    async def publish(self, payload: dict[str, Any], *, force: bool = False) -> None:
        # one publisher: its hub's `_sent` already keeps an unchanged snapshot back, nothing to skip here
        self._next_id += 1
        if self._deliver is not None:
            self._deliver(self._next_id, payload)

    async def stop(self) -> None:
        self._deliver = None
        self.connected = False


# Publish a line's snapshot unless Redis records it as the line's last published one, and record it:
# one atomic step, so two replicas never both see "not yet published", and a recorded snapshot was
# published (a separate record-then-publish that failed between the two would silence the others).
# KEYS: the line's last-snapshot key, the event counter. ARGV: content digest, "1" to force, record
# lifetime (ms), channel, payload JSON. Returns the event id, or nil when skipped. The message is
# byte for byte what json.dumps({"id": id, "payload": payload}) makes.
PUBLISH_ONCE = """
if ARGV[2] ~= '1' and redis.call('GET', KEYS[1]) == ARGV[1] then
    return false
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
local id = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[4], '{"id": ' .. string.format('%d', id) .. ', "payload": ' .. ARGV[5] .. '}')
return id
"""


class RedisBroker:
    """Redis pub/sub: every replica publishes to one channel and hears every replica's events; a
    snapshot some replica already published as its line's last is not published again."""

    # the wait before subscribing again, doubled per failure up to the maximum: a screen stays stale
    # at most that long (plus redis-py's own retries) once Redis is back
    reconnect_first_seconds = 0.5
    reconnect_max_seconds = 10.0
    # how long a line's last published snapshot is remembered: replicas compute the same change within
    # a query's time of each other, so a minute dedupes them; a record that outlived its truth (Redis
    # restored from an old dump) stops suppressing by then, and a lost one costs a duplicate, not a loss
    last_snapshot_seconds = 60.0

    def __init__(self, url: str, prefix: str) -> None:
        import redis.asyncio as redis

        # a connection whose packets are dropped (no reset) would leave get_message() answering None
        # for ever: the pub/sub connection is pinged every 10 s and TCP keepalive is on
        self.client = redis.Redis.from_url(url, health_check_interval=10, socket_keepalive=True)
        self.channel = f"{prefix}:events"
        self.counter = f"{prefix}:event-id"
        self.last_snapshot = f"{prefix}:last-snapshot"  # + ":<line>": the digest of its last published
        self._publish_once = self.client.register_script(PUBLISH_ONCE)  # EVALSHA, loaded again if lost
        self.connected = False  # a subscription confirmed and no error since
        self._confirmed_before = False
        self._reader: asyncio.Task[None] | None = None

    async def start(self, deliver: Deliver, reconnected: Reconnected = _nothing) -> None:
        pubsub = await self._subscribe()  # Redis unreachable at start fails the start, as before
        self._reader = asyncio.create_task(self._read(pubsub, deliver, reconnected), name="pvqc-redis-events")

    async def _subscribe(self) -> Any:
        pubsub = self.client.pubsub()
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                await pubsub.subscribe(self.channel)
        except BaseException:
            await _close(pubsub)
            raise
        return pubsub

    async def _read(self, pubsub: Any, deliver: Deliver, reconnected: Reconnected) -> None:
        """Hear the channel until stopped: an outage longer than redis-py's own retries (a ConnectionError
        out of `get_message`) is waited out and the channel subscribed again, so one outage does not end
        this replica's live stream for good."""
        delay = 0.0
        while True:
            try:
                if pubsub is None:
                    pubsub = await self._subscribe()
                await self._listen(pubsub, deliver, reconnected)
            except Exception as exc:  # connection errors above all; any other must not end the stream either
                delay = _next_delay(
                    delay, self.connected, self.reconnect_first_seconds, self.reconnect_max_seconds
                )
                _log_lost(exc, self.connected, delay)
                self.connected = False
            finally:
                if pubsub is not None:
                    await _close(pubsub)
                pubsub = None
            await asyncio.sleep(delay)

    async def _listen(self, pubsub: Any, deliver: Deliver, reconnected: Reconnected) -> None:
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            if message["type"] == "subscribe":
                # confirmed: at start, after our own re-subscribe, or after redis-py reconnected by
                # itself within its retries; but for the first, events were missed meanwhile
                self.connected = True
                if self._confirmed_before:
                    log.info("live events: subscribed to %s again; every line is re-sent", self.channel)
                    reconnected()
                self._confirmed_before = True
            elif message["type"] == "message":
                self._hand_on(message, deliver)

    def _hand_on(self, message: dict[str, Any], deliver: Deliver) -> None:
        try:
            body = json.loads(message["data"])
            event_id, payload = int(body["id"]), body["payload"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed message on %s", self.channel)
            return
        deliver(event_id, payload)

    async def publish(self, payload: dict[str, Any], *, force: bool = False) -> None:
        """Number the snapshot and send it to every replica, unless the line's last published snapshot
        (any replica's) says the same: the replica that computed it first sent it, and this one's
        hub hears it (it has heard the line since subscribing, or `force` is set)."""
        line_id = str(payload.get("line_id"))
        keys = [f"{self.last_snapshot}:{line_id}", self.counter]
        ttl_ms = int(self.last_snapshot_seconds * 1000)
        args = [content_digest(payload), "1" if force else "0", ttl_ms, self.channel, json.dumps(payload)]
        if await self._publish_once(keys=keys, args=args) is None:
            log.debug("live events: %s's snapshot was published by another replica already", line_id)

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        await self.client.aclose()


def _log_lost(exc: Exception, was_connected: bool, delay: float) -> None:
    from redis.exceptions import RedisError

    if not isinstance(exc, RedisError | OSError):  # not an outage: a bug, whose traceback is wanted
        log.error("live events: the Redis reader failed; subscribing again in %.1f s", delay, exc_info=exc)
    elif was_connected:
        log.warning("live events: lost Redis (%s); subscribing again in %.1f s", exc, delay)
    else:
        log.info("live events: Redis still unreachable (%s); next try in %.1f s", exc, delay)


def _next_delay(delay: float, was_connected: bool, first: float, most: float) -> float:
    """Wait `first` after losing a working connection, then twice as long per failed try, at most `most`."""
    return first if was_connected else min(max(first, 2 * delay), most)


async def _close(pubsub: Any) -> None:
    with contextlib.suppress(Exception):  # closing a connection to a Redis that is gone may fail too
        await pubsub.aclose()


def make_broker(settings: Settings) -> Broker:
    if settings.broker_url:
        log.info("live events through Redis at %s (prefix %s)", settings.broker_url, settings.broker_prefix)
        return RedisBroker(settings.broker_url, settings.broker_prefix)
    return InProcessBroker()


class Reservation:
    """One admitted stream's place in the hub's limit, from admission until the stream connects (the
    place becomes its registration) or its response ends without starting it (`end_stream`). `release`
    is the one way out of the count and works once, so every path may call it."""

    def __init__(self, hub: LiveEvents) -> None:
        self.hub = hub
        self.held = True

    def release(self) -> bool:
        """Give the place back; True the first time, False after (idempotent)."""
        if not self.held:
            return False
        self.held = False
        self.hub.reserved -= 1
        return True


def release_when_dropped(stream: object, reservation: Reservation) -> None:
    """Free `reservation` once `stream` is garbage: the backstop for a response that was built but never
    run (its `end_stream` never called); a response that ran has freed it already. The finalizer may
    run in any thread (a cyclic collection on a worker), and the hub's counts belong to the event loop,
    so the release is handed to the loop."""
    loop = asyncio.get_running_loop()

    def release() -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the hub went with it
            loop.call_soon_threadsafe(reservation.release)

    weakref.finalize(stream, release)


class TooManyClientsError(RuntimeError):
    pass


RESYNC = object()  # queued for a client that fell behind: send it the latest state whole


@dataclass(eq=False)
class Client:
    line_id: str | None  # a line key's stream carries only its own line
    queue: asyncio.Queue[LiveEvent | object]
    resyncs: int = 0
    # the hub's arrival number up to which this client has been given the state (catch-up, resync):
    # a queued event at or below it is already covered and is not sent twice
    covered: int = 0

    def wants(self, line_id: str) -> bool:
        return self.line_id is None or self.line_id == line_id


class LiveEvents:
    """The app's EventPublisher and the hub every SSE stream of this replica registers with."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], broker: Broker) -> None:
        self.settings = settings
        self.sessions = sessions
        self.broker = broker
        self.clients: set[Client] = set()
        self.reserved = 0  # streams admitted by /events whose body has not started yet (Reservation)
        self.latest: dict[str, LiveEvent] = {}  # per line, the event that arrived last
        self.recent: deque[LiveEvent] = deque(maxlen=settings.sse_replay_events)
        self.arrivals = 0  # events delivered to this hub, since start
        self._sent: dict[str, dict[str, Any]] = {}  # what this replica last saw per line, for "changed?"
        # lines whose latest event this hub may have missed: every line at start and after the broker
        # missed events; a line leaves when an event of it arrives. Their next snapshot is published
        # even where another replica published the same one: that event never reached these screens
        self._unheard: set[str] = set(settings.lines)
        self._dirty: set[str] = set()
        self.resyncs = 0  # clients that fell behind, since start (a load test wants none)
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._computing: asyncio.Future[list[dict[str, Any]]] | None = None  # the snapshot query in flight
        self.refresh_failures = 0  # refreshes failed in a row (database or broker), for /healthz

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self.deliver, self.resend_all)
        self._task = asyncio.create_task(self._refresh_forever(), name="pvqc-live-refresher")

    def health(self) -> dict[str, object]:
        """For /healthz: whether this replica's screens get live updates now, and if not, why."""
        if self._task is None or self._task.done():
            return {
                "status": "down",
                "reason": "the snapshot refresher is not running",
                "clients": len(self.clients),
            }
        if not self.broker.connected:
            reason = "the event broker is unreachable: reconnecting, screens are not updated meanwhile"
            return {"status": "down", "reason": reason, "clients": len(self.clients)}
        if self.refresh_failures >= REFRESH_FAILURES_DOWN:
            reason = (
                f"the last {self.refresh_failures} snapshot refreshes failed (see the log): screens are not "
                "updated meanwhile"
            )
            return {"status": "down", "reason": reason, "clients": len(self.clients)}
        return {"status": "ok", "clients": len(self.clients)}

    def resend_all(self) -> None:
        """The broker missed events (an outage): recompute every line and publish it even if unchanged."""
        self._sent.clear()
        self._unheard |= set(self.settings.lines)
        self._dirty |= set(self.settings.lines)
        self._wake.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._computing is not None:
            # A cancelled refresher leaves its query running in its thread: wait for it, so no
            # transaction outlives the service (its engine is disposed next, and a query still
            # holding table locks deadlocked a DROP TABLE in the tests' teardown).
            await asyncio.wait([self._computing])
        for client in list(self.clients):
            self.disconnect(client)
        await self.broker.stop()

    # -- EventPublisher -------------------------------------------------------------------------

    async def publish(self, event: InspectionCompleted) -> None:
        if event.line_id in self.settings.lines:
            self._dirty.add(event.line_id)
            self._wake.set()

    # -- refresher ------------------------------------------------------------------------------

    async def _refresh_forever(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time()  # the first pass computes every line: screens get state at once
        while True:
            with anyio.move_on_after(max(0.0, next_full - loop.time())):
                await self._wake.wait()
            self._wake.clear()
            if loop.time() >= next_full:
                lines, next_full = set(self.settings.lines), loop.time() + self.settings.alarm_check_seconds
            else:
                lines = set()
            lines |= self._dirty
            self._dirty = set()
            try:
                await self.refresh(sorted(lines))
            except Exception:  # a database or broker hiccup must not end live updates for good
                self.refresh_failures += 1
                failures = self.refresh_failures  # retries back off during an outage
                if failures == 1:  # the traceback once; an outage's every retry would flood the log
                    log.exception("live refresh of %s failed; retrying", sorted(lines))
                else:
                    log.warning("live refresh failed again (%d in a row)", failures)
                self._dirty |= lines
                self._wake.set()  # try those lines again after the pause, not at the next full pass
                await anyio.sleep(min(REFRESH_RETRY_MAX_SECONDS, 2.0 ** (failures - 1)))
            else:
                if self.refresh_failures:
                    log.info("live refresh works again after %d failures", self.refresh_failures)
                self.refresh_failures = 0
            await anyio.sleep(self.settings.events_min_interval_seconds)

    async def refresh(self, lines: list[str]) -> None:
        """Recompute these lines' snapshots and publish those that changed."""
        if not lines:
            return
        now = datetime.now(UTC)
        # its own future, shielded: cancelling the refresher must not lose track of the thread
        self._computing = asyncio.get_running_loop().run_in_executor(None, self._compute, lines, now)
        snapshots = await asyncio.shield(self._computing)
        for snapshot in snapshots:
            line_id = snapshot["line_id"]
            if self._sent.get(line_id) == snapshot:
                continue
            payload = {**snapshot, "generated_at": now.isoformat()}
            await self.broker.publish(payload, force=line_id in self._unheard)
            # only once it went out (or another replica's equal one did): remembered before, a failed
            # publish would read as sent, and an idle line (whose snapshot stays equal) would never be
            # published again
            self._sent[line_id] = snapshot

    def _compute(self, lines: list[str], now: datetime) -> list[dict[str, Any]]:
        return [line_snapshot(self.sessions, self.settings, line_id, now) for line_id in lines]

    # -- hub ------------------------------------------------------------------------------------

    def deliver(self, event_id: int, payload: dict[str, Any]) -> None:
        """A numbered snapshot from the broker (any replica's): keep it and hand it to every client."""
        line_id = str(payload.get("line_id"))
        self.arrivals += 1
        event = LiveEvent(event_id, line_id, payload, sse_frame(event_id, payload), self.arrivals)
        self._sent[line_id] = snapshot_content(payload)
        self._unheard.discard(line_id)  # the newest of its line: later ones arrive after it
        self.recent.append(event)
        # the last to arrive, not the highest id: after Redis restarted without its data the ids
        # start again at 1, and the highest would freeze every new screen on a snapshot from before
        self.latest[line_id] = event
        for client in self.clients:
            if client.wants(line_id):
                self._offer(client, event)

    def _offer(self, client: Client, event: LiveEvent) -> None:
        try:
            client.queue.put_nowait(event)
        except asyncio.QueueFull:
            # too slow: drop what it has not read and send it the latest state whole instead
            while not client.queue.empty():
                client.queue.get_nowait()
            client.queue.put_nowait(RESYNC)
            client.resyncs += 1
            self.resyncs += 1

    def _refuse_if_full(self) -> None:
        open_streams = len(self.clients) + self.reserved
        limit = self.settings.sse_max_clients
        if open_streams >= limit:
            raise TooManyClientsError(
                f"live stream limit reached: this replica serves at most {limit} streams "
                f"({open_streams} open or starting); retry later"
            )

    def reserve(self) -> Reservation:
        """A place for one more stream, taken when the request is admitted: the stream's body starts
        only after the 200 went out, too late to refuse it, so the limit is checked here. Check and
        count are one step (no await between them on the loop that owns the counts): of a burst of
        concurrent connects, exactly as many as there are free places get one."""
        self._refuse_if_full()
        self.reserved += 1
        return Reservation(self)

    def connect(self, line_id: str | None, reservation: Reservation | None = None) -> Client:
        admitted = reservation is not None and reservation.release()  # its place was counted then
        if not admitted:
            self._refuse_if_full()
        client = Client(line_id, asyncio.Queue(maxsize=self.settings.sse_client_queue))
        self.clients.add(client)
        return client

    def disconnect(self, client: Client) -> None:
        self.clients.discard(client)

    def catch_up(self, client: Client, last_event_id: int | None) -> list[LiveEvent]:
        """Events a (re)connecting client needs: those after its last one, else the latest per line."""
        after = self._after(last_event_id) if last_event_id is not None else None
        if after is None:
            return self.snapshot_for(client)
        client.covered = self.arrivals
        return [e for e in after if client.wants(e.line_id)]

    def _after(self, last_event_id: int) -> list[LiveEvent] | None:
        """The events that arrived after this id, or None where that cannot be told."""
        recent = list(self.recent)
        at = [i for i, e in enumerate(recent) if e.id == last_event_id]
        # unknown (too old), above the newest id (from before the counter was reset), or there twice
        # (once on each side of a reset): the client starts again from the latest state
        if len(at) != 1 or last_event_id > recent[-1].id:
            return None
        return recent[at[0] + 1 :]

    def snapshot_for(self, client: Client) -> list[LiveEvent]:
        """The latest state whole, in arrival order: the newest last, so that a browser's next
        Last-Event-ID names it."""
        client.covered = self.arrivals
        return sorted((e for e in self.latest.values() if client.wants(e.line_id)), key=lambda e: e.arrival)


async def _always_allowed() -> bool:
    return True


async def end_stream(stream: AsyncGenerator[bytes, None], reservation: Reservation) -> None:
    """End one admitted stream for good, whatever ended its response: the stream ran out, the client
    left (the send was cancelled), or the response failed before the stream began. Closing runs the
    stream's `finally` (a connected client leaves the hub) even where a cancelled send left it suspended
    at a `yield`, which would otherwise wait for the garbage collector; a stream that never began never
    registered, and its reserved place is given back instead. Safe to call more than once."""
    try:
        with anyio.CancelScope(shield=True):  # called from a cancelled response: must still finish
            await stream.aclose()
    finally:
        reservation.release()  # a no-op once the stream's start took the place over


async def sse_stream(
    hub: LiveEvents,
    line_id: str | None,
    last_event_id: int | None,
    keepalive: float,
    disconnected: Callable[[], Awaitable[bool]],
    allowed: Callable[[], Awaitable[bool]] = _always_allowed,
    reservation: Reservation | None = None,
) -> AsyncGenerator[bytes, None]:
    """One client's stream. It registers only once iterated, so its `finally` always unregisters; the
    place `reservation` holds (taken when the request was admitted) becomes its registration. Whoever
    serves it closes it with `end_stream`.

    `allowed` is asked again every few seconds: a stream outlives the request that checked its key,
    and a revoked key's screen must stop hearing the lines (within the key cache's time).
    """
    client = hub.connect(line_id, reservation)
    # a disconnect is noticed by cancellation (Starlette watches the socket) or, at the latest,
    # by this check between events: a closed screen never stays counted against the limit
    check_every = min(keepalive, DISCONNECT_CHECK_SECONDS)
    next_check = time.monotonic() + check_every
    silent = 0.0
    try:
        # taken in the same step as registering, before the first yield: an event arriving from now on
        # is queued and not in the catch-up (taken after it, one landing meanwhile was in both)
        backlog = hub.catch_up(client, last_event_id)
        yield f"retry: {RETRY_MS}\n\n".encode()
        for event in backlog:
            yield event.frame
        while True:
            try:
                item: object | None = await asyncio.wait_for(client.queue.get(), timeout=check_every)
            except TimeoutError:
                item = None
            # on the clock, not only when idle: a busy stream is checked as often as a quiet one
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + check_every
                if await disconnected():
                    return
                try:
                    still = await allowed()
                except Exception:  # a database blip must not close every screen: ask again next time
                    log.warning("live stream: its key could not be checked again", exc_info=True)
                    still = True
                if not still:
                    log.info("live stream closed: its key is no longer valid")
                    return
            if item is None:
                silent += check_every
                if silent >= keepalive:
                    silent = 0.0
                    yield b": keep-alive\n\n"  # proxies close silent connections; browsers ignore comments
                continue
            silent = 0.0
            if item is RESYNC:
                for event in hub.snapshot_for(client):
                    yield event.frame
            elif isinstance(item, LiveEvent) and item.arrival > client.covered:
                yield item.frame
    finally:
        hub.disconnect(client)
