"""The engineers' review API: the queue, one module with its labels, decisions, heat maps, the audit
trail and the effective labels retraining uses. Role: engineer or higher.

Decisions are only ever appended (`POST .../decisions`): there is no route that changes or removes
one, and the database refuses it too (triggers of migration 0002).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Path, Query
from pydantic import BaseModel, Field, model_validator

from serving.auth import EngineerRole, Role, require
from serving.db import ReviewDecision
from serving.deps import ServicesDep
from serving.errors import ApiError
from serving.review import (
    AuditQuery,
    CellChange,
    CellLabel,
    Decision,
    DecisionRefusedError,
    DefectType,
    QueueQuery,
    ReviewedVerdict,
    ReviewState,
    Target,
    audit_trail,
    cell_key,
    inspection_with_labels,
    record_decision,
    review_queue,
    reviewed_labels,
)
from serving.schemas import InspectionOut, InspectionSummary, inspection_out, summary_of
from serving.store import get_inspection
from serving.verdicts import ModuleVerdict
from serving.views import cell_heatmap

router = APIRouter(prefix="/review", tags=["review"], dependencies=[Depends(require(Role.ENGINEER))])


class QueueItemOut(InspectionSummary):
    sampled: bool  # a PASS in the queue only because of the random sample
    reviewed: dict[str, Any] | None  # the latest module decision, if any
    shadow: dict[str, Any] | None = None  # a shadow model's judgement: verdict, disagreeing cells


class QueuePage(BaseModel):
    items: list[QueueItemOut]
    next_before_id: int | None


class DecisionOut(BaseModel):
    id: int
    inspection_id: int
    target: Target
    row: int | None
    col: int | None
    before: dict[str, Any]
    after: dict[str, Any]
    note: str | None
    reviewer: str
    created_at: datetime


class ReviewedInspectionOut(BaseModel):
    inspection: InspectionOut
    module_label: dict[str, Any]
    cell_labels: dict[str, dict[str, Any]]  # "row,col" -> label in force
    history: list[DecisionOut]


class CellDecisionIn(BaseModel):
    row: int = Field(ge=0)
    col: int = Field(ge=0)
    label: CellLabel
    defect_type: DefectType | None = None

    @model_validator(mode="after")
    def _type_goes_with_defective(self) -> CellDecisionIn:
        if self.label is CellLabel.DEFECTIVE and self.defect_type is None:
            raise ValueError(f"a defective cell needs a defect_type, one of {[t.value for t in DefectType]}")
        if self.label is CellLabel.FUNCTIONAL and self.defect_type is not None:
            raise ValueError("a functional cell takes no defect_type")
        return self


class DecisionIn(BaseModel):
    module: ReviewedVerdict | None = Field(default=None, description="the module verdict, PASS or FAIL")
    cells: list[CellDecisionIn] = Field(default_factory=list, max_length=400)
    note: str | None = Field(default=None, max_length=2000)

    @model_validator(mode="after")
    def _decides_something(self) -> DecisionIn:
        if self.module is None and not self.cells:
            raise ValueError("expected a module verdict, cell labels, or both")
        return self


class EffectiveLabelsOut(BaseModel):
    inspection_id: int
    line_id: str
    serial: str
    model_version: str
    frame_sha256: str
    frame_pruned_at: datetime | None  # set if the retention policy deleted the frame before a review
    module: dict[str, Any]
    cells: list[dict[str, Any]]  # every cell: row, col, polygon, label in force (model's or review's)


class LabelsPage(BaseModel):
    items: list[EffectiveLabelsOut]
    next_after_inspection: int | None


def decision_out(row: ReviewDecision) -> DecisionOut:
    return DecisionOut(
        id=row.id,
        inspection_id=row.inspection_id,
        target=Target(row.target),
        row=row.row,
        col=row.col,
        before=row.before,
        after=row.after,
        note=row.note,
        reviewer=row.reviewer,
        created_at=row.created_at,
    )


def _aware(**values: datetime | None) -> None:
    for name, value in values.items():
        if value is not None and value.tzinfo is None:
            raise ApiError(422, f"{name} must carry a timezone, e.g. 2026-01-31T06:00:00Z")


@router.get("/vocabulary")
async def vocabulary() -> dict[str, list[str]]:
    """The fixed lists the review page offers (so the page never hard-codes them)."""
    return {
        "module_verdicts": [v.value for v in ReviewedVerdict],
        "cell_labels": [v.value for v in CellLabel],
        "defect_types": [v.value for v in DefectType],
        "queue_states": [v.value for v in ReviewState],
        "verdicts": [v.value for v in ModuleVerdict],
    }


@router.get("/queue")
async def queue(
    services: ServicesDep,
    line_id: str | None = None,
    verdict: ModuleVerdict | None = None,
    model_version: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    state: ReviewState = ReviewState.PENDING,
    before_id: Annotated[int | None, Query(ge=1)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    shadow_disagrees: Annotated[
        bool | None, Query(description="true: only modules a shadow model judged otherwise")
    ] = None,
) -> QueuePage:
    """FAIL and REVIEW modules plus the PASS sample, newest first; pending ones by default."""
    _aware(since=since, until=until)
    query = QueueQuery(
        services.settings.review_pass_sample_rate,
        line_id,
        verdict,
        model_version,
        since,
        until,
        state,
        before_id,
        limit,
        shadow_disagrees,
    )
    items = await anyio.to_thread.run_sync(review_queue, services.sessions, query)
    out = [
        QueueItemOut(
            **summary_of(i.inspection).model_dump(), sampled=i.sampled, reviewed=i.reviewed, shadow=i.shadow
        )
        for i in items
    ]
    return QueuePage(items=out, next_before_id=items[-1].inspection.id if len(items) == limit else None)


@router.get("/inspections/{inspection_id}")
async def reviewed_inspection(services: ServicesDep, inspection_id: int) -> ReviewedInspectionOut:
    found = await anyio.to_thread.run_sync(inspection_with_labels, services.sessions, inspection_id)
    if found is None:
        raise ApiError(404, f"no inspection {inspection_id}")
    inspection, labels, history = found
    return ReviewedInspectionOut(
        inspection=inspection_out(inspection),
        module_label=labels.module,
        cell_labels=labels.cells,
        history=[decision_out(d) for d in history],
    )


@router.post("/inspections/{inspection_id}/decisions", status_code=201)
async def decide(
    services: ServicesDep, engineer: EngineerRole, inspection_id: int, body: DecisionIn
) -> list[DecisionOut]:
    """Append the engineer's decision: one audit row per decided target (module, each cell)."""
    decision = Decision(
        module=body.module,
        cells=[CellChange(c.row, c.col, c.label, c.defect_type) for c in body.cells],
        note=body.note.strip() if body.note and body.note.strip() else None,
    )
    try:
        rows = await anyio.to_thread.run_sync(
            record_decision, services.sessions, inspection_id, decision, engineer.name
        )
    except DecisionRefusedError as exc:
        raise ApiError(exc.status, str(exc)) from exc
    return [decision_out(r) for r in rows]


@router.get("/inspections/{inspection_id}/cells/{row}/{col}/heatmap")
async def heatmap(
    services: ServicesDep,
    inspection_id: int,
    row: Annotated[int, Path(ge=0)],
    col: Annotated[int, Path(ge=0)],
) -> dict[str, Any]:
    """Where in the cell the network saw a defect: its activation map, computed now, not at ingestion."""
    inspection = await anyio.to_thread.run_sync(get_inspection, services.sessions, inspection_id)
    if inspection is None:
        raise ApiError(404, f"no inspection {inspection_id}")
    return await cell_heatmap(services, inspection, row, col)


@router.get("/decisions")
async def decisions(
    services: ServicesDep,
    inspection_id: int | None = None,
    reviewer: str | None = None,
    line_id: str | None = None,
    since: datetime | None = None,
    after_id: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[DecisionOut]:
    """The audit trail, oldest first (page on with `after_id` = the last id seen).

    Paging through what is there is exact. Following the trail while engineers decide is not quite:
    a decision takes its id when written and shows when committed, so on PostgreSQL two saves on
    different modules at the same moment can show in the other order, and a reader that had seen
    the higher id would page past the lower one. A consumer that tails the trail re-reads from a
    little before its last id (say `after_id` = last - 50) and keeps the ids it has not seen.
    """
    _aware(since=since)
    query = AuditQuery(inspection_id, reviewer, line_id, since, after_id, limit)
    return [decision_out(d) for d in await anyio.to_thread.run_sync(audit_trail, services.sessions, query)]


@router.get("/labels")
async def labels(
    services: ServicesDep,
    line_id: str | None = None,
    after_inspection: Annotated[int | None, Query(ge=0)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> LabelsPage:
    """Effective labels of reviewed inspections: the latest decision per module and cell wins."""
    modules = await anyio.to_thread.run_sync(
        reviewed_labels, services.sessions, line_id, after_inspection, limit
    )
    items = [
        EffectiveLabelsOut(
            inspection_id=m.inspection.id,
            line_id=m.inspection.line_id,
            serial=m.inspection.serial,
            model_version=m.inspection.model_version,
            frame_sha256=m.inspection.frame_sha256,
            frame_pruned_at=m.inspection.frame_pruned_at,
            module=m.labels.module,
            cells=[
                {"row": c.row, "col": c.col, "polygon": c.polygon, **m.labels.cells[cell_key(c.row, c.col)]}
                for c in m.inspection.cells
            ],
        )
        for m in modules
    ]
    return LabelsPage(
        items=items, next_after_inspection=items[-1].inspection_id if len(items) == limit else None
    )
