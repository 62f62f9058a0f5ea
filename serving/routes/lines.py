"""Lines: their configuration, frame ingestion per line, and per-line pass-rate statistics.

Owns: `POST /lines/{line_id}/modules` (a whole-module frame), `POST /lines/{line_id}/cells` (one
cell), `GET /lines`, `GET /lines/{line_id}` and `GET /lines/{line_id}/stats`. Role: line or higher,
a line key only for its own line.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request, Response

from serving.auth import Role, require
from serving.deps import BodyDep, FrameIdentityDep, LineDep, PrincipalDep, ServicesDep
from serving.errors import ApiError
from serving.pipeline import FrameRequest, inspect_cell, inspect_module
from serving.schemas import InspectionOut, PassRateOut
from serving.settings import MIN_GRID, LineConfig, shift_start
from serving.store import pass_rate

# every route needs a key of role line or higher; a line key only reaches its own line (LineDep)
router = APIRouter(prefix="/lines", tags=["lines"], dependencies=[Depends(require(Role.LINE))])

IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            t: {"schema": {"type": "string", "format": "binary"}}
            for t in ("image/png", "image/jpeg", "image/tiff")
        },
    }
}


class Window(enum.StrEnum):
    LAST = "last"  # the last N modules
    HOUR = "hour"  # the last 60 minutes
    SHIFT = "shift"  # since the start of the current shift


@router.get("")
async def list_lines(services: ServicesDep, principal: PrincipalDep) -> dict[str, LineConfig]:
    return {k: v for k, v in services.settings.lines.items() if principal.may_see_line(k)}


@router.get("/{line_id}")
async def get_line(line: LineDep) -> LineConfig:
    return line


def _answer(response: Response, result: InspectionOut) -> InspectionOut:
    response.status_code = 200 if result.duplicate else 201
    response.headers["Location"] = f"/inspections/{result.inspection_id}"
    return result


@router.post("/{line_id}/modules", status_code=201, openapi_extra=IMAGE_BODY)
async def post_module(
    line_id: str,
    request: Request,
    response: Response,
    services: ServicesDep,
    line: LineDep,
    body: BodyDep,
    identity: FrameIdentityDep,
    rows: Annotated[int | None, Query(description="grid rows; default: the line's")] = None,
    cols: Annotated[int | None, Query(description="grid columns; default: the line's")] = None,
) -> InspectionOut:
    """Inspect a whole-module frame: geometry, every cell classified, the module verdict, stored."""
    grid_rows, grid_cols = rows if rows is not None else line.rows, cols if cols is not None else line.cols
    limit = services.settings.max_grid_cells
    # a grid with one row or one column has no gaps along that axis to check against the frame: noise
    # or a bright square passed as a 1x1 "module", and a 2x6 module as 1x6 (a single cell has its route)
    if grid_rows < MIN_GRID or grid_cols < MIN_GRID or grid_rows * grid_cols > limit:
        raise ApiError(
            400,
            f"grid {grid_rows}x{grid_cols} is not accepted: expected rows, cols >= {MIN_GRID}, at most "
            f"{limit} cells (one cell goes to /lines/{line_id}/cells)",
        )
    frame = FrameRequest(line_id, *identity, body, request.headers.get("content-type"))
    return _answer(response, await inspect_module(services, frame, grid_rows, grid_cols))


@router.post("/{line_id}/cells", status_code=201, openapi_extra=IMAGE_BODY)
async def post_cell(
    line_id: str,
    request: Request,
    response: Response,
    services: ServicesDep,
    line: LineDep,
    body: BodyDep,
    identity: FrameIdentityDep,
) -> InspectionOut:
    """Inspect one cell image (resized to the model's input size)."""
    frame = FrameRequest(line_id, *identity, body, request.headers.get("content-type"))
    return _answer(response, await inspect_cell(services, frame))


@router.get("/{line_id}/stats")
async def line_stats(
    line_id: str,
    services: ServicesDep,
    line: LineDep,
    window: Window = Window.LAST,
    last: Annotated[int | None, Query(ge=1, le=100_000)] = None,
) -> PassRateOut:
    """Pass rate of the line's modules over the last N modules, the last hour, or the current shift."""
    since: datetime | None = None
    count: int | None = None
    if window is Window.LAST:
        count = last or services.settings.stats_default_last
    elif window is Window.HOUR:
        since = datetime.now(UTC) - timedelta(hours=1)
    else:
        since = shift_start(line, datetime.now(UTC), services.settings.zone)
    stats = await anyio.to_thread.run_sync(
        lambda: pass_rate(services.sessions, line_id, since=since, last=count)
    )
    rate = stats.pass_rate
    return PassRateOut(
        line_id=line_id,
        window=f"last {count}" if count else window.value,
        since=since,
        modules=stats.modules,
        counts=stats.counts,
        pass_rate=rate,
        pass_rate_floor=line.pass_rate_floor,
        below_floor=rate is not None and rate < line.pass_rate_floor,
        first_at=stats.first_at,
        last_at=stats.last_at,
    )
