"""The inspection pipeline: bytes of a frame in, a stored inspection out.

Owns the order of work for the module and cell routes, and where each step runs: decoding, geometry
and storage block, so they run in worker threads; inference goes through the micro-batcher; only
bookkeeping touches the event loop. The row and the frame file are committed before the caller
answers, and the inspection-completed event is published after that commit.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import anyio
import numpy as np

from model.card import CellVerdict
from model.preprocess import cell_probabilities, flatten_views, image_views
from serving.app import Services
from serving.db import Inspection, InspectionCell, utcnow
from serving.errors import ApiError
from serving.events import InspectionCompleted, publish_safely
from serving.images import DecodedImage, ImageRejectedError, ImageType, decode_image, parse_content_type
from serving.inference import ModelRuntime, QueueFullError
from serving.schemas import InspectionOut, inspection_out
from serving.store import find_existing, insert_inspection, sha256_hex
from serving.verdicts import InspectionKind, ModuleVerdict, module_verdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FrameRequest:
    line_id: str
    serial: str
    frame_id: str
    body: bytes
    content_type: str | None


@dataclass
class _Cells:
    views: list[np.ndarray]  # (V, S, S) uint8 each: what the model judges of each cell
    positions: list[tuple[int, int]]  # (row, col) each
    polygons: list[list[list[float]] | None]
    geometry_ok: bool = True
    confidence: float | None = None
    reason: str | None = None
    modules_in_view: int | None = None
    notes: list[str] = field(default_factory=list)


class _Clock:
    def __init__(self) -> None:
        self.start = self.mark = time.perf_counter()
        self.ms: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.ms[name] = round((now - self.mark) * 1000, 2)
        self.mark = now

    def total(self) -> None:
        self.ms["total"] = round((time.perf_counter() - self.start) * 1000, 2)


async def inspect_module(services: Services, request: FrameRequest, rows: int, cols: int) -> InspectionOut:
    return await _inspect(services, request, InspectionKind.MODULE, rows, cols)


async def inspect_cell(services: Services, request: FrameRequest) -> InspectionOut:
    return await _inspect(services, request, InspectionKind.CELL, 1, 1)


async def _inspect(
    services: Services, request: FrameRequest, kind: InspectionKind, rows: int, cols: int
) -> InspectionOut:
    earlier = await anyio.to_thread.run_sync(
        find_existing, services.sessions, request.line_id, request.serial, request.frame_id
    )
    if earlier is not None:  # a re-post (e.g. a retry after a lost response): answer, never count twice
        digest = await anyio.to_thread.run_sync(sha256_hex, request.body)  # up to 64 MB: not on the loop
        return inspection_out(_same_frame(earlier, request, digest), duplicate=True)
    # a lower bound (a half cell is two model inputs, known only once cut): refuses before decoding when
    # the queue is plainly full; the batcher checks the exact count
    services.refuse_never_fits(rows * cols, f"this frame ({rows * cols} cells, two inputs per half cell)")
    if not services.batcher.has_room(rows * cols):
        services.refuse_queue_full(f"{services.batcher.pending_cells} model inputs already waiting")
    clock = _Clock()
    # the model this request starts with judges it to the end, whatever a hot swap does meanwhile
    runtime = services.runtime
    try:
        image_type = parse_content_type(request.content_type)
        # decoded and cut in one go on one of frame_workers threads: the decoded frame is the big
        # allocation, so it must not wait for a cutting thread while holding no token
        decoded, cells = await anyio.to_thread.run_sync(
            _decode_and_cut,
            request.body,
            image_type,
            (kind, rows, cols, runtime.size),
            services.settings.max_pixels,
            clock,
            limiter=services.frame_limiter,
        )
    except ImageRejectedError as exc:
        services.metrics.rejected.labels("image").inc()
        raise ApiError(exc.status, str(exc)) from exc
    probabilities = await _probabilities(services, runtime, cells.views)
    _refuse_non_finite(services, runtime, probabilities)
    clock.lap("inference")
    row = _inspection_row(runtime, request, kind, rows, cols, decoded, cells, probabilities)
    stored, created = await anyio.to_thread.run_sync(_persist, services, request.body, decoded, row, clock)
    if created:
        _count(services, stored)
        await publish_safely(services.publisher, _event_of(stored))
        shadow = services.shadow
        if shadow is not None and cells.views:
            from serving.shadow import shadow_later

            shadow_later(services, shadow, stored, decoded.grey, cells.views)
    # a concurrent twin stored first: `row` holds the digest this body was stored under
    return inspection_out(
        stored if created else _same_frame(stored, request, row.frame_sha256), duplicate=not created
    )


def _same_frame(earlier: Inspection, request: FrameRequest, digest: str) -> Inspection:
    """The stored inspection a re-post names, if the re-post carries the same image.

    A retry after a lost response sends the same bytes and gets the stored answer. Different bytes
    under the same (line, serial, frame id) are a new shot: answering with the old verdict would
    tell the line about an image nobody judged, so it is refused.
    """
    if earlier.frame_sha256 != digest:
        raise ApiError(
            409,
            f"frame {request.frame_id!r} of module {request.serial!r} on line {request.line_id} was "
            f"already judged from another image (sha256 {earlier.frame_sha256[:12]}..., this one "
            f"{digest[:12]}...): post a new shot under a new X-Frame-Id",
        )
    return earlier


def _refuse_non_finite(services: Services, runtime: ModelRuntime, probabilities: list[float]) -> None:
    """A model that answers NaN or infinity cannot judge: no verdict, and certainly no PASS.

    NaN compares false with every threshold, so it would read as a functional cell; PostgreSQL would
    store it and SQLite would refuse it. The line gets a 500 naming the model, and the frame is not
    stored as judged.
    """
    broken = sum(1 for p in probabilities if not math.isfinite(p))
    if broken:
        services.metrics.rejected.labels("model_output").inc()
        card = runtime.card
        log.error("model %s %s gave %d non-finite probabilities", card.name, card.version, broken)
        raise ApiError(
            500,
            f"model {card.name} {card.version} gave no finite probability for {broken} of "
            f"{len(probabilities)} cell(s); nothing was judged or stored",
        )


def _decode_and_cut(
    body: bytes,
    image_type: ImageType,
    grid: tuple[InspectionKind, int, int, int],
    max_pixels: int,
    clock: _Clock,
) -> tuple[DecodedImage, _Cells]:
    """The frame decoded, then located and cut (module) or taken whole (cell) at the model's size."""
    kind, rows, cols, size = grid
    decoded = decode_image(body, image_type, max_pixels)
    clock.lap("decode")
    if kind is InspectionKind.MODULE:
        cells = _cut_module(decoded, rows, cols, size, max_pixels)
    else:
        cells = _whole_cell(decoded, size)
    clock.lap("geometry")
    return decoded, cells


def _cut_module(decoded: DecodedImage, rows: int, cols: int, size: int, max_pixels: int) -> _Cells:
    from model.geometry import cut_module  # imported here: geometry pulls in more than the rest needs

    geometry = cut_module(decoded.grey, rows, cols, size, max_pixels=max_pixels)
    # a refused frame keeps what the geometry saw too: "2 modules in view" explains a REVIEW as well
    cells = [] if not geometry.ok else geometry.cells
    return _Cells(
        views=[cell.views for cell in cells],
        positions=[(cell.row, cell.col) for cell in cells],
        polygons=[np.asarray(cell.polygon, dtype=float).round(2).tolist() for cell in cells],
        geometry_ok=geometry.ok,
        confidence=geometry.confidence,
        reason=geometry.reason,
        # refused before any module was located: how many were in view is not known
        modules_in_view=geometry.modules_in_view if geometry.corners is not None else None,
        notes=list(geometry.notes),
    )


def _whole_cell(decoded: DecodedImage, size: int) -> _Cells:
    w, h = float(decoded.width), float(decoded.height)
    outline = [[0.0, 0.0], [w, 0.0], [w, h], [0.0, h]]
    return _Cells([image_views(decoded.grey, size)], [(0, 0)], [outline], confidence=1.0)


async def _probabilities(services: Services, runtime: ModelRuntime, views: list[np.ndarray]) -> list[float]:
    """Each cell's probability: the lowest of its views' (a half cell has two, model.preprocess)."""
    if not views:
        return []
    flat, counts = flatten_views(views)
    services.refuse_never_fits(len(flat), f"this frame ({len(views)} cells, two inputs per half cell)")
    # uint8 (n, 1, S, S): the batcher makes the float32 input of cells_to_batch per onnxruntime call,
    # so waiting cells take a quarter of the memory
    try:
        outputs = await services.batcher.infer(flat[:, None], runtime)
    except QueueFullError as exc:
        services.refuse_queue_full(str(exc))
    probability = np.asarray(outputs[runtime.card.probability_output])
    return [float(p) for p in cell_probabilities(probability, counts)]


def _inspection_row(
    runtime: ModelRuntime,
    request: FrameRequest,
    kind: InspectionKind,
    rows: int,
    cols: int,
    decoded: DecodedImage,
    cells: _Cells,
    probabilities: list[float],
) -> Inspection:
    card = runtime.card
    points = card.operating_points
    judged = [points.judge(p) for p in probabilities]
    verdict = module_verdict(judged, cells.geometry_ok)
    return Inspection(
        line_id=request.line_id,
        serial=request.serial,
        frame_id=request.frame_id,
        kind=kind.value,
        verdict=verdict.value,
        reason=cells.reason if not cells.geometry_ok else _reason(judged),
        rows=rows,
        cols=cols,
        n_defective=judged.count(CellVerdict.DEFECTIVE),
        n_uncertain=judged.count(CellVerdict.UNCERTAIN),
        model_name=card.name,
        model_version=card.version,
        threshold=points.threshold,
        review_threshold=points.review_threshold,
        frame_sha256="",  # set by _persist with the hash it stores under
        frame_content_type=decoded.image_type.value,
        frame_width=decoded.width,
        frame_height=decoded.height,
        geometry_ok=cells.geometry_ok,
        geometry_confidence=cells.confidence,
        modules_in_view=cells.modules_in_view,
        geometry_notes=cells.notes if kind is InspectionKind.MODULE else None,
        timings_ms={},
        created_at=utcnow(),
        cells=[
            InspectionCell(position=i, row=r, col=c, probability=p, verdict=v.value, polygon=polygon)
            for i, ((r, c), p, v, polygon) in enumerate(
                zip(cells.positions, probabilities, judged, cells.polygons, strict=True)
            )
        ],
    )


def _reason(judged: list[CellVerdict]) -> str | None:
    defective, uncertain = judged.count(CellVerdict.DEFECTIVE), judged.count(CellVerdict.UNCERTAIN)
    if defective:
        return f"{defective} defective cell(s)"
    if uncertain:
        return f"{uncertain} uncertain cell(s)"
    return None


def _persist(
    services: Services, body: bytes, decoded: DecodedImage, row: Inspection, clock: _Clock
) -> tuple[Inspection, bool]:
    # the frame written and fsynced first, under a private name: insert_inspection gives it its
    # content-addressed name before the commit (a committed row never points at a missing file) and
    # removes it if a concurrent twin won (a loser leaves no file nobody references)
    digest = sha256_hex(body)
    staged = services.frames.stage(body, digest, decoded.image_type.extension)
    row.frame_sha256 = digest
    clock.lap("store_frame")
    clock.total()
    row.timings_ms = dict(clock.ms)  # everything but the commit itself, which cannot time its own row
    return insert_inspection(services.sessions, row, staged)


def _count(services: Services, row: Inspection) -> None:
    services.metrics.verdicts.labels(row.line_id, row.kind, row.verdict, row.model_version).inc()


def _event_of(row: Inspection) -> InspectionCompleted:
    return InspectionCompleted(
        inspection_id=row.id,
        line_id=row.line_id,
        serial=row.serial,
        kind=InspectionKind(row.kind),
        verdict=ModuleVerdict(row.verdict),
        n_defective=row.n_defective,
        n_uncertain=row.n_uncertain,
        model_version=row.model_version,
        created_at=row.created_at,
    )
