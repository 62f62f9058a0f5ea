"""`GET /events`: the Server-Sent Events stream of every line's snapshot (a line key: its own line).

The browser's EventSource reconnects by itself and sends `Last-Event-ID`; the stream then
continues after that event, or starts with the latest snapshot of each line. Role: line or higher.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Request
from fastapi.responses import StreamingResponse

from serving.auth import LineRole, Role, presented_key
from serving.deps import ServicesDep, header_count
from serving.errors import ApiError
from serving.live import TooManyClientsError, release_when_dropped, sse_stream

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
    try:
        reservation = hub.reserve()
    except TooManyClientsError as exc:
        raise ApiError(503, str(exc), {"Retry-After": "5"}) from None
    last = _event_id(last_event_id)
    line_id = principal.line_id if principal.role is Role.LINE else None
    key = presented_key(request)

    async def still_allowed() -> bool:  # the key is checked again while the stream lasts
        return key is not None and await services.keys.check(key) is not None

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
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering either
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


def _event_id(header: str | None) -> int | None:
    """The id in a Last-Event-ID header, or None for one that is no event id (the stream starts afresh)."""
    return header_count(header)
