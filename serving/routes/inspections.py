"""Stored inspections: list (filtered, newest first, keyset-paginated), one with its cells, its frame,
a JPEG preview of the frame (both 410 once the retention policy removed the frame). Role: line or
higher; a line key sees only its own line's."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, BinaryIO

import anyio
from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import StreamingResponse

from serving.app import Services
from serving.auth import Principal, Role, require
from serving.db import Inspection
from serving.deps import PrincipalDep, ServicesDep
from serving.errors import ApiError
from serving.images import ImageType
from serving.schemas import InspectionOut, InspectionPage, inspection_out, summary_of
from serving.store import InspectionQuery, get_inspection, list_inspections
from serving.verdicts import InspectionKind, ModuleVerdict
from serving.views import open_stored_frame

FRAME_CHUNK = 256 * 1024

router = APIRouter(prefix="/inspections", tags=["inspections"], dependencies=[Depends(require(Role.LINE))])


async def visible_inspection(services: Services, principal: Principal, inspection_id: int) -> Inspection:
    """The inspection, 404 if unknown, 403 if a line key asks for another line's."""
    row = await anyio.to_thread.run_sync(get_inspection, services.sessions, inspection_id)
    if row is None:
        raise ApiError(404, f"no inspection {inspection_id}")
    principal.check_line(row.line_id)
    return row


@router.get("")
async def inspections(
    services: ServicesDep,
    principal: PrincipalDep,
    line_id: str | None = None,
    verdict: ModuleVerdict | None = None,
    kind: InspectionKind | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before_id: Annotated[int | None, Query(ge=1)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> InspectionPage:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise ApiError(422, f"{name} must carry a timezone, e.g. 2026-01-31T06:00:00Z")
    if principal.role is Role.LINE:
        line_id = line_id or principal.line_id
        principal.check_line(line_id or "")
    query = InspectionQuery(line_id, verdict, kind, since, until, before_id, limit)
    rows = await anyio.to_thread.run_sync(list_inspections, services.sessions, query)
    next_before = rows[-1].id if len(rows) == limit else None
    return InspectionPage(items=[summary_of(r) for r in rows], next_before_id=next_before)


@router.get("/{inspection_id}")
async def inspection(services: ServicesDep, principal: PrincipalDep, inspection_id: int) -> InspectionOut:
    return inspection_out(await visible_inspection(services, principal, inspection_id))


@router.get("/{inspection_id}/frame")
async def inspection_frame(
    services: ServicesDep, principal: PrincipalDep, inspection_id: int
) -> StreamingResponse:
    """The stored frame as it was posted; 410 when the retention policy (or anything else) removed it."""
    row = await visible_inspection(services, principal, inspection_id)
    handle, size = await anyio.to_thread.run_sync(open_stored_frame, services.frames, row)
    return StreamingResponse(
        read_chunks(handle),
        media_type=ImageType(row.frame_content_type).value,
        # content-addressed: the digest names these bytes for good, as FileResponse's ETag did the file
        headers={"Content-Length": str(size), "ETag": f'"{row.frame_sha256}"'},
    )


def read_chunks(handle: BinaryIO) -> Iterator[bytes]:
    """The open frame file in chunks (Starlette reads a plain iterator in a worker thread); closes it."""
    with handle:
        while chunk := handle.read(FRAME_CHUNK):
            yield chunk


@router.get("/{inspection_id}/preview", response_class=Response)
async def inspection_preview(
    services: ServicesDep,
    principal: PrincipalDep,
    inspection_id: int,
    width: Annotated[int, Query(ge=16, le=4096)] = 1024,
) -> Response:
    """The stored frame as an 8-bit JPEG about `width` pixels wide (snapped up to a fixed set of
    widths; never wider than the frame): what browsers can show."""
    row = await visible_inspection(services, principal, inspection_id)
    data = await services.previews.get(services, row, width)
    # a stored frame never changes (content-addressed): let the browser keep it
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})
