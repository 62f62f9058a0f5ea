"""Stored inspections: list (filtered, newest first, keyset-paginated), one with its cells, its frame."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import anyio
from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from serving.deps import ServicesDep
from serving.errors import ApiError
from serving.images import ImageType
from serving.schemas import InspectionOut, InspectionPage, inspection_out, summary_of
from serving.store import InspectionQuery, get_inspection, list_inspections
from serving.verdicts import InspectionKind, ModuleVerdict

router = APIRouter(prefix="/inspections", tags=["inspections"])


@router.get("")
async def inspections(
    services: ServicesDep,
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
    query = InspectionQuery(line_id, verdict, kind, since, until, before_id, limit)
    rows = await anyio.to_thread.run_sync(list_inspections, services.sessions, query)
    next_before = rows[-1].id if len(rows) == limit else None
    return InspectionPage(items=[summary_of(r) for r in rows], next_before_id=next_before)


@router.get("/{inspection_id}")
async def inspection(services: ServicesDep, inspection_id: int) -> InspectionOut:
    row = await anyio.to_thread.run_sync(get_inspection, services.sessions, inspection_id)
    if row is None:
        raise ApiError(404, f"no inspection {inspection_id}")
    return inspection_out(row)


@router.get("/{inspection_id}/frame")
async def inspection_frame(services: ServicesDep, inspection_id: int) -> FileResponse:
    row = await anyio.to_thread.run_sync(get_inspection, services.sessions, inspection_id)
    if row is None:
        raise ApiError(404, f"no inspection {inspection_id}")
    image_type = ImageType(row.frame_content_type)
    path = services.frames.path_for(row.frame_sha256, image_type.extension)
    if not path.is_file():
        raise ApiError(410, f"frame {row.frame_sha256} of inspection {inspection_id} is no longer stored")
    return FileResponse(path, media_type=image_type.value)
