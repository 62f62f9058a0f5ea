"""Notifications that an inspection was stored, for whatever wants to listen (the live screen).

Owns: the InspectionCompleted event and the EventPublisher protocol the routes call AFTER the row is
committed. The app's lifespan plugs in the live-event hub (`serving/live.py`: in-process, or Redis
pub/sub between replicas) plus any publisher passed to `create_app` (tests, scripts). A publisher
must not raise into the route: `publish_safely` guards that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from serving.verdicts import InspectionKind, ModuleVerdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InspectionCompleted:
    inspection_id: int
    line_id: str
    serial: str
    kind: InspectionKind
    verdict: ModuleVerdict
    n_defective: int
    n_uncertain: int
    model_version: str
    created_at: datetime


class EventPublisher(Protocol):
    async def publish(self, event: InspectionCompleted) -> None: ...


class LoggingPublisher:
    """The embedded default until a live-event broker is plugged in."""

    async def publish(self, event: InspectionCompleted) -> None:
        log.debug("inspection %d on %s: %s", event.inspection_id, event.line_id, event.verdict)


class RecordingPublisher:
    """Keeps every event in memory: for tests and for embedding the service in a script."""

    def __init__(self) -> None:
        self.events: list[InspectionCompleted] = []

    async def publish(self, event: InspectionCompleted) -> None:
        self.events.append(event)


async def publish_safely(publisher: EventPublisher, event: InspectionCompleted) -> None:
    # the inspection is already durable: a failing listener must not turn that into an error response
    try:
        await publisher.publish(event)
    except Exception:
        log.exception("event publisher failed for inspection %d", event.inspection_id)
