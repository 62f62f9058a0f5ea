"""`GET /events`: the Server-Sent Events stream of every line's snapshot (a line key: its own line).

The browser's EventSource reconnects by itself and sends `Last-Event-ID`; the stream then
continues after that event, or starts with the latest snapshot of each line. Role: line or higher.
Past the replica's stream limit (`PVQC_SSE_MAX_CLIENTS`) a request gets a 503 with Retry-After: the
place is reserved before the 200, and the response frees it whenever it ends.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serving.auth import LineRole, Role, presented_key
from serving.deps import ServicesDep, header_count
from serving.errors import ApiError
from serving.live import (
    LiveEvents,
    Reservation,
    TooManyClientsError,
    end_stream,
    release_when_dropped,
    sse_stream,
)

RETRY_AFTER_SECONDS = "5"  # what a refused client is told to wait before connecting again

router = APIRouter(tags=["live"])


@router.get("/events", response_class=StreamingResponse)
async def events(
    request: Request,
    services: ServicesDep,
    principal: LineRole,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    hub = services.live
    if hub is None:
        raise ApiError(503, "live events are not running")
    last = _event_id(last_event_id)
    line_id = principal.line_id if principal.role is Role.LINE else None
    key = presented_key(request)

    async def still_allowed() -> bool:  # the key is checked again while the stream lasts
        return key is not None and await services.keys.check(key) is not None

    # the last step before the response exists: from here on something always gives the place back
    reservation = _reserve(hub)
    try:
        stream = sse_stream(
            hub,
            line_id,
            last,
            services.settings.sse_keepalive_seconds,
            request.is_disconnected,
            still_allowed,
            reservation,
        )
        release_when_dropped(stream, reservation)
        return LiveStreamResponse(stream, reservation)
    except BaseException:  # no response owns the place: give it back now
        reservation.release()
        raise


def _reserve(hub: LiveEvents) -> Reservation:
    """This request's place among the replica's streams, or the 503 a client can retry: taken before
    the 200 goes out, since a stream refused after it would be an error inside a 200."""
    try:
        return hub.reserve()
    except TooManyClientsError as exc:
        raise ApiError(503, str(exc), {"Retry-After": RETRY_AFTER_SECONDS}) from None


class LiveStreamResponse(StreamingResponse):
    """The 200 of one admitted stream. Owns the stream and its reserved place until the response is
    over, however it ends (the stream ran out, the client left and the send was cancelled, the client
    was gone before the first byte), and then closes the stream and frees the place (`end_stream`)."""

    def __init__(self, stream: AsyncGenerator[bytes, None], reservation: Reservation) -> None:
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering either
        super().__init__(stream, media_type="text/event-stream", headers=headers)
        self.stream = stream
        self.reservation = reservation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await end_stream(self.stream, self.reservation)


def _event_id(header: str | None) -> int | None:
    """The id in a Last-Event-ID header, or None for one that is no event id (the stream starts afresh)."""
    return header_count(header)
