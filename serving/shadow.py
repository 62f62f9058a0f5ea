"""Shadow mode: a candidate model scores live frames beside the active one, never changing a verdict.

Owns: scoring a stored inspection's cells with the shadow runtime after the line has its answer (a
background task: the line never waits for the shadow), judging them with the shadow card's own
operating points, and storing a `ShadowResult` that records where it disagrees with the active
model, which the review queue can filter on. When the batcher is busy the shadow skips the frame:
live traffic comes first.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from model.preprocess import cell_probabilities, flatten_views
from serving.app import Services
from serving.db import Inspection, ShadowResult, utcnow
from serving.inference import ModelRuntime
from serving.verdicts import InspectionKind, module_verdict

log = logging.getLogger(__name__)


def shadow_later(
    services: Services,
    shadow: ModelRuntime,
    inspection: Inspection,
    grey: np.ndarray,
    views: list[np.ndarray],
) -> None:
    """Schedule the shadow's scoring of a just-stored inspection; the task is kept until done.

    At most `in_flight_limit` scorings wait at once: each holds its cells (and, when the shadow's
    input size differs, the whole frame), so under sustained load the shadow skips frames rather
    than letting memory grow.
    """
    limit = in_flight_limit(services)
    if len(services.tasks) >= limit:
        log.info("shadow skipped inspection %d: %d scorings already in flight", inspection.id, limit)
        return
    # the frame is only needed to cut cells at another size; otherwise it is not kept alive
    frame = None if views and views[0].shape[-1] == shadow.size else grey
    task = asyncio.create_task(
        score_in_shadow(services, shadow, inspection, frame, views), name=f"pvqc-shadow-{inspection.id}"
    )
    services.tasks.add(task)
    task.add_done_callback(services.tasks.discard)


def in_flight_limit(services: Services) -> int:
    """Two scorings per frame worker: enough to keep up when the line leaves room, no backlog."""
    return 2 * services.settings.resolved_frame_workers


def cut_for(
    shadow: ModelRuntime, grey: np.ndarray, polygons: list[Any], whole_frame: bool
) -> list[np.ndarray]:
    """Each cell's views at the shadow's input size, cut again from the frame as the pipeline cut them."""
    from model.geometry import stored_cell_views

    return [stored_cell_views(grey, p, shadow.size, whole_frame) for p in polygons]


async def score_in_shadow(
    services: Services,
    shadow: ModelRuntime,
    inspection: Inspection,
    grey: np.ndarray | None,
    views: list[np.ndarray],
) -> None:
    try:
        if not services.batcher.has_room(sum(len(v) for v in views)):
            log.info("shadow skipped inspection %d: the batcher is busy", inspection.id)
            return
        if grey is not None:  # another input size: cut again from the frame
            polygons = [cell.polygon for cell in inspection.cells]
            whole_frame = inspection.kind == InspectionKind.CELL.value
            views = await anyio.to_thread.run_sync(
                cut_for, shadow, grey, polygons, whole_frame, limiter=services.frame_limiter
            )
        flat, counts = flatten_views(views)
        outputs = await services.batcher.infer(flat[:, None], shadow)
        probabilities = cell_probabilities(np.asarray(outputs[shadow.card.probability_output]), counts)
        points = shadow.card.operating_points
        judged = [points.judge(float(p)) for p in probabilities]
        verdict = module_verdict(judged, True)
        records: list[dict[str, Any]] = []
        for cell, p, v in zip(inspection.cells, probabilities, judged, strict=True):
            records.append(
                {
                    "row": cell.row,
                    "col": cell.col,
                    "probability": round(float(p), 6),
                    "verdict": v.value,
                    "active_verdict": cell.verdict,
                    "disagrees": v.value != cell.verdict,
                }
            )
        n_disagreeing = sum(1 for r in records if r["disagrees"])
        row = ShadowResult(
            inspection_id=inspection.id,
            model_name=shadow.card.name,
            model_version=shadow.card.version,
            verdict=verdict.value,
            disagrees=bool(n_disagreeing) or verdict.value != inspection.verdict,
            n_disagreeing_cells=n_disagreeing,
            cells=records,
            created_at=utcnow(),
        )
        await anyio.to_thread.run_sync(store_shadow, services.sessions, row)
    except Exception:  # the shadow must never disturb the service
        log.exception("shadow scoring of inspection %d failed", inspection.id)


def store_shadow(sessions: sessionmaker[Session], row: ShadowResult) -> None:
    with sessions() as session:
        session.add(row)
        try:
            session.commit()
        except IntegrityError:  # this version already scored this inspection (a re-post)
            session.rollback()
