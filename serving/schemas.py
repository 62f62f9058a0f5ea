"""Response bodies of the inspection routes (pydantic), and their mapping from stored rows.

Owns: the JSON shape lines and screens see. A stored inspection reads back exactly as it was
answered when created, which is what makes re-posting a frame idempotent.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from model.card import CellVerdict
from serving.db import Inspection
from serving.verdicts import InspectionKind, ModuleVerdict


class CellOut(BaseModel):
    row: int
    col: int
    probability: float
    verdict: CellVerdict
    polygon: list[list[float]] | None = None


class ModelOut(BaseModel):
    name: str
    version: str
    threshold: float
    review_threshold: float


class InspectionSummary(BaseModel):
    inspection_id: int
    line_id: str
    serial: str
    frame_id: str
    kind: InspectionKind
    verdict: ModuleVerdict
    reason: str | None
    rows: int
    cols: int
    n_defective: int
    n_uncertain: int
    model: ModelOut
    frame_sha256: str
    created_at: datetime
    # when the retention policy deleted the frame (its verdict and cells stay); None: the frame is kept
    frame_pruned_at: datetime | None = None


class InspectionOut(InspectionSummary):
    duplicate: bool = False  # True when this (line, serial, frame id) had been stored before
    geometry_ok: bool
    geometry_confidence: float | None
    modules_in_view: int | None  # module frames: modules the geometry saw; the largest is judged
    geometry_notes: list[str]  # what the geometry noticed besides its verdict, e.g. other modules in view
    defective_cells: list[list[int]]  # [row, col] of each defective cell
    cells: list[CellOut]
    timings_ms: dict[str, float]
    frame_url: str
    frame_width: int  # pixels of the stored frame, the space the cell polygons are in
    frame_height: int


class InspectionPage(BaseModel):
    items: list[InspectionSummary]
    next_before_id: int | None  # pass as `before_id` for the next page; None at the end


class PassRateOut(BaseModel):
    line_id: str
    window: str
    since: datetime | None
    modules: int
    counts: dict[str, int]
    pass_rate: float | None
    pass_rate_floor: float
    below_floor: bool
    first_at: datetime | None
    last_at: datetime | None


def summary_of(row: Inspection) -> InspectionSummary:
    return InspectionSummary.model_validate(_summary_fields(row))


def inspection_out(row: Inspection, duplicate: bool = False) -> InspectionOut:
    cells = [
        CellOut(
            row=c.row, col=c.col, probability=c.probability, verdict=CellVerdict(c.verdict), polygon=c.polygon
        )
        for c in row.cells
    ]
    return InspectionOut.model_validate(
        {
            **_summary_fields(row),
            "duplicate": duplicate,
            "geometry_ok": row.geometry_ok,
            "geometry_confidence": row.geometry_confidence,
            "modules_in_view": row.modules_in_view,
            "geometry_notes": row.geometry_notes or [],
            "defective_cells": [[c.row, c.col] for c in cells if c.verdict is CellVerdict.DEFECTIVE],
            "cells": cells,
            "timings_ms": row.timings_ms,
            "frame_url": f"/inspections/{row.id}/frame",
            "frame_width": row.frame_width,
            "frame_height": row.frame_height,
        }
    )


def _summary_fields(row: Inspection) -> dict[str, object]:
    return {
        "inspection_id": row.id,
        "line_id": row.line_id,
        "serial": row.serial,
        "frame_id": row.frame_id,
        "kind": InspectionKind(row.kind),
        "verdict": ModuleVerdict(row.verdict),
        "reason": row.reason,
        "rows": row.rows,
        "cols": row.cols,
        "n_defective": row.n_defective,
        "n_uncertain": row.n_uncertain,
        "model": ModelOut(
            name=row.model_name,
            version=row.model_version,
            threshold=row.threshold,
            review_threshold=row.review_threshold,
        ),
        "frame_sha256": row.frame_sha256,
        "created_at": row.created_at,
        "frame_pruned_at": row.frame_pruned_at,
    }
