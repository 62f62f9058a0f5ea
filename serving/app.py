"""The FastAPI application: `create_app(settings)` and the lifespan that owns every heavy object.

Owns: start-up (Alembic `upgrade head`, the first admin key, the database engine, the frame store,
the onnxruntime session and its micro-batcher, metrics, the live-event hub and its broker, with
a model registry configured the follower that hot-swaps the served model, and with a frame
retention configured the pruner that deletes old PASS frames) and orderly shutdown,
gathered in one `Services` object on `app.state.services` that routes reach through
`serving.deps`; which routers and static files the app serves. Nothing heavy is created at import
time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import anyio
from fastapi import FastAPI, Request, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from serving.auth import KeyChecker, ensure_admin_key
from serving.db import make_engine, upgrade_head
from serving.errors import ApiError, install_error_handlers
from serving.events import EventPublisher, InspectionCompleted
from serving.inference import MicroBatcher, ModelRuntime, load_runtime
from serving.live import LiveEvents, make_broker
from serving.metrics import ServiceMetrics
from serving.retention import FramePruner
from serving.settings import Settings
from serving.store import FrameStore
from serving.views import PreviewCache

if TYPE_CHECKING:
    from serving.models import ModelFollower

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).with_name("web") / "static"


@dataclass
class Services:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    frames: FrameStore
    runtime: ModelRuntime
    batcher: MicroBatcher
    metrics: ServiceMetrics
    keys: KeyChecker
    previews: PreviewCache
    shadow: ModelRuntime | None = None  # a candidate scoring live frames beside the active model
    follower: ModelFollower | None = None  # set by the lifespan when a model registry is configured
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # background work (shadow scoring)
    listeners: list[EventPublisher] = field(default_factory=list)  # besides the live hub
    live: LiveEvents | None = None  # set by the lifespan: it needs the running event loop
    # set by the lifespan when PVQC_FRAME_RETENTION_DAYS is set: deletes old PASS frames in the background
    retention: FramePruner | None = None
    # decoding and geometry of frames share this many worker threads (settings.frame_workers), so
    # a burst of large frames waits instead of converting all at once; set by the lifespan
    frame_limiter: anyio.CapacityLimiter | None = None
    # V2 request bodies are parsed on this many threads of their own (as many as frame workers): a
    # JSON tensor near the body limit takes seconds and hundreds of MB while it becomes an array
    v2_parse_limiter: anyio.CapacityLimiter | None = None

    @property
    def publisher(self) -> EventPublisher:
        return _FanOut(self)

    def refuse_queue_full(self, why: str) -> NoReturn:
        """The 503 with Retry-After that every route answers when the inference queue is full."""
        self.metrics.rejected.labels("queue_full").inc()
        retry = str(self.settings.retry_after_seconds)
        raise ApiError(503, f"inference queue is full: {why}; retry later", {"Retry-After": retry})

    def refuse_never_fits(self, inputs: int, what: str) -> None:
        """413 for a request of more model inputs than the whole queue holds: unlike a busy queue's 503,
        a retry would meet the same refusal forever."""
        limit = self.batcher.max_queue_cells
        if inputs > limit:
            self.metrics.rejected.labels("too_large").inc()
            raise ApiError(
                413,
                f"{what} is {inputs} model inputs and the queue holds at most {limit}: raise "
                "PVQC_MAX_QUEUE_CELLS or send fewer",
            )


class _FanOut:
    """The live hub plus any extra listener (tests, embedding scripts) hear every stored inspection."""

    def __init__(self, services: Services) -> None:
        self.services = services

    async def publish(self, event: InspectionCompleted) -> None:
        if self.services.live is not None:
            await self.services.live.publish(event)
        for listener in self.services.listeners:
            await listener.publish(event)


def start_services(settings: Settings, publisher: EventPublisher | None) -> Services:
    """Everything the routes need, ready to serve (blocking: run it off the event loop)."""
    engine = make_engine(settings.resolved_database_url, settings.db_pool_size, settings.db_max_overflow)
    upgrade_head(engine)
    sessions = sessionmaker(engine, expire_on_commit=False)
    configured = settings.bootstrap_admin_key
    ensure_admin_key(sessions, configured.get_secret_value() if configured else None)
    runtime = load_runtime(served_model_dir(settings), settings.model_variant, settings.session_threads)
    metrics = ServiceMetrics()
    batcher = MicroBatcher(
        runtime,
        settings.max_batch,
        settings.max_wait_ms,
        settings.max_queue_cells,
        observe=metrics.observe_batch,
        workers=settings.resolved_inference_workers,
    )
    metrics.track_queue(lambda: batcher.pending_cells)
    batcher.start()
    return Services(
        settings=settings,
        engine=engine,
        sessions=sessions,
        frames=FrameStore(settings.resolved_frames_dir),
        runtime=runtime,
        batcher=batcher,
        metrics=metrics,
        keys=KeyChecker(sessions, settings.auth_cache_seconds),
        previews=PreviewCache(settings.resolved_frames_dir / "previews"),
        listeners=[publisher] if publisher is not None else [],
    )


def start_retention(services: Services) -> FramePruner | None:
    """The frame pruner, running (its first pass now), when the factory chose a retention; else None:
    by default every frame is kept."""
    settings = services.settings
    if settings.frame_retention_days is None:
        return None
    pruner = FramePruner(
        services.sessions,
        services.frames,
        settings,
        previews=services.previews.root,
        observe=services.metrics.observe_pruned,
    )
    pruner.start()
    log.info(
        "frame retention on: frames of unflagged, unreviewed PASS modules older than %d day(s) are "
        "deleted every %.0f s",
        settings.frame_retention_days,
        settings.frame_retention_interval_seconds,
    )
    return pruner


def served_model_dir(settings: Settings) -> Path:
    """The registry's active version when a registry is configured and names one, else model_dir."""
    if settings.model_registry is not None:
        from model.registry import Registry

        active = Registry(settings.model_registry).active()
        if active is not None:
            return Registry(settings.model_registry).folder(active)
        log.warning(
            "registry %s has no active version: serving %s", settings.model_registry, settings.model_dir
        )
    return settings.model_dir


async def finish_background(tasks: set[asyncio.Task[None]], grace_seconds: float) -> None:
    """Let background work (shadow scoring) finish before the database goes away.

    Each task ends in a worker thread that writes its row, and a thread cannot be cancelled: a
    cancelled task would leave its thread writing while the engine is disposed (and, in tests, while
    the tables are dropped). So the tasks get a grace period to finish (a shadow row takes
    milliseconds). Tasks still running after it are cancelled; a thread of theirs that is already
    writing then finishes on its own, against a disposed engine, and its row may be lost.
    """
    pending = list(tasks)
    if not pending:
        return
    _, late = await asyncio.wait(pending, timeout=grace_seconds)
    for task in late:
        log.warning("%s did not finish within %.1f s: cancelled", task.get_name(), grace_seconds)
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)


def stop_services(services: Services) -> None:
    services.batcher.stop()
    services.engine.dispose()


def create_app(settings: Settings | None = None, publisher: EventPublisher | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await anyio.to_thread.run_sync(start_services, settings, publisher)
        services.frame_limiter = anyio.CapacityLimiter(settings.resolved_frame_workers)
        services.v2_parse_limiter = anyio.CapacityLimiter(settings.resolved_frame_workers)
        live = LiveEvents(settings, services.sessions, make_broker(settings))
        follow: asyncio.Task[None] | None = None
        try:
            await live.start()
            services.live = live
            if settings.model_registry is not None:
                from model.registry import Registry
                from serving.models import ModelFollower

                services.follower = ModelFollower(services, Registry(settings.model_registry))
                # the first look at the registry is done before the first request: the shadow version
                # is loaded by then, and a promotion made just after startup is a change the next poll
                # sees rather than a race with a first poll still pending
                await services.follower.check()
                follow = asyncio.create_task(services.follower.run(), name="pvqc-model-follower")
            services.retention = start_retention(services)
            app.state.services = services
            yield
        finally:
            await finish_background(services.tasks, settings.shutdown_grace_seconds)
            if follow is not None:
                follow.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await follow
            if services.retention is not None:
                await services.retention.stop()
            await live.stop()
            await anyio.to_thread.run_sync(stop_services, services)

    app = FastAPI(
        title="pvqc inspection service",
        summary="EL frames of solar modules in, durable PASS / REVIEW / FAIL verdicts out",
        lifespan=lifespan,
        # the schema is served behind a key by serving.routes.pages; the stock docs pages load
        # their scripts from a CDN, which a factory network may not reach
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.middleware("http")(_time_requests)
    _include_routers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def _include_routers(app: FastAPI) -> None:
    from serving.routes import events, health, inspections, keys, lines, metrics, models, pages, review, v2

    for module in (health, lines, inspections, v2, metrics, keys, models, review, events, pages):
        app.include_router(module.router)


async def _time_requests(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    started = time.perf_counter()
    try:
        response = await call_next(request)
    except Exception:
        # call_next re-raises what the app raised, and ServerErrorMiddleware answers its 500 outside
        # this middleware: count that 500 here, or failures never show in the request metric
        _observe_request(request, 500, started)
        raise
    _observe_request(request, response.status_code, started)
    return response


def _observe_request(request: Request, status: int, started: float) -> None:
    services: Services | None = getattr(request.app.state, "services", None)
    if services is not None:
        services.metrics.request_seconds.labels(
            request.method, _route_template(request), str(status)
        ).observe(time.perf_counter() - started)


def _route_template(request: Request) -> str:
    # label by template (/inspections/{inspection_id}), not by path, so label sets stay bounded;
    # the router leaves the matched route in the scope
    route = request.scope.get("route")
    return str(getattr(route, "path_format", None) or getattr(route, "path", None) or "unmatched")
