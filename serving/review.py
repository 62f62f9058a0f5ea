"""The engineers' review: the queue of modules to look at, decisions, and the labels they make.

Owns: which inspections are in the review queue (FAIL and REVIEW, plus a fixed pseudo-random
sample of PASS, since a pass rate alone hides escapes), recording decisions in the append-only
`review_decisions` table (each with the label before and after), and the effective labels (the
latest decision per module and per cell) that retraining uses. All functions here block: routes
call them through `anyio.to_thread`.
"""

from __future__ import annotations

import contextlib
import enum
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Select, and_, exists, func, or_, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from serving.db import Inspection, ReviewDecision, ShadowResult, utcnow
from serving.verdicts import ModuleVerdict

# Knuth's multiplicative hash of the id: a PASS module's place in the sample is random-looking but
# fixed, so the queue does not reshuffle between page loads or replicas. The id is reduced modulo a
# prime first so the product stays far inside 64 bits on PostgreSQL at any id.
SAMPLE_MULTIPLIER = 2654435761
SAMPLE_PRIME = 1_000_003
SAMPLE_SCALE = 10_000


class Target(enum.StrEnum):
    MODULE = "module"
    CELL = "cell"


class ReviewedVerdict(enum.StrEnum):
    """What an engineer may decide for a module: REVIEW is the model's doubt, not an answer."""

    PASS = "PASS"
    FAIL = "FAIL"


class CellLabel(enum.StrEnum):
    FUNCTIONAL = "functional"
    DEFECTIVE = "defective"


class DefectType(enum.StrEnum):
    CRACK = "crack"
    FINGER_INTERRUPTION = "finger_interruption"
    INACTIVE_AREA = "inactive_area"
    SOLDERING = "soldering"
    OTHER = "other"


class ReviewState(enum.StrEnum):
    PENDING = "pending"  # no module decision yet
    REVIEWED = "reviewed"
    ALL = "all"


class DecisionRefusedError(ValueError):
    """A decision that does not fit its inspection (unknown cell, ...); routes answer 4xx."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# -- the queue ----------------------------------------------------------------------------------


def in_queue(sample_rate: float) -> ColumnElement[bool]:
    flagged = Inspection.verdict.in_([ModuleVerdict.FAIL.value, ModuleVerdict.REVIEW.value])
    cut = round(sample_rate * SAMPLE_SCALE)
    sampled = and_(
        Inspection.verdict == ModuleVerdict.PASS.value,
        ((Inspection.id % SAMPLE_PRIME) * SAMPLE_MULTIPLIER) % SAMPLE_SCALE < cut,
        # a PASS whose frame the retention policy removed (sampled out at a lower rate then) has
        # nothing left to review; flagged modules' frames are never removed
        Inspection.frame_pruned_at.is_(None),
    )
    return or_(flagged, sampled)


def has_module_decision() -> ColumnElement[bool]:
    return exists().where(
        ReviewDecision.inspection_id == Inspection.id, ReviewDecision.target == Target.MODULE.value
    )


@dataclass(frozen=True)
class QueueQuery:
    sample_rate: float
    line_id: str | None = None
    verdict: ModuleVerdict | None = None
    model_version: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    state: ReviewState = ReviewState.PENDING
    before_id: int | None = None
    limit: int = 50
    shadow_disagrees: bool | None = None  # True: only modules a shadow model judged otherwise


@dataclass(frozen=True)
class QueueItem:
    inspection: Inspection
    sampled: bool  # a PASS in the queue only because of the sample
    reviewed: dict[str, Any] | None  # the latest module decision's `after`, if any
    shadow: dict[str, Any] | None = None  # the latest shadow model's judgement, if one scored it


def queue_statement(query: QueueQuery) -> Select[Inspection]:
    statement = select(Inspection).where(in_queue(query.sample_rate))
    if query.line_id is not None:
        statement = statement.where(Inspection.line_id == query.line_id)
    if query.verdict is not None:
        statement = statement.where(Inspection.verdict == query.verdict.value)
    if query.model_version is not None:
        statement = statement.where(Inspection.model_version == query.model_version)
    if query.since is not None:
        statement = statement.where(Inspection.created_at >= query.since)
    if query.until is not None:
        statement = statement.where(Inspection.created_at < query.until)
    if query.state is ReviewState.PENDING:
        statement = statement.where(~has_module_decision())
    elif query.state is ReviewState.REVIEWED:
        statement = statement.where(has_module_decision())
    if query.before_id is not None:
        statement = statement.where(Inspection.id < query.before_id)
    if query.shadow_disagrees is not None:
        disagreeing = exists().where(ShadowResult.inspection_id == Inspection.id, ShadowResult.disagrees)
        statement = statement.where(disagreeing if query.shadow_disagrees else ~disagreeing)
    return statement


def review_queue(sessions: sessionmaker[Session], query: QueueQuery) -> list[QueueItem]:
    statement = queue_statement(query).order_by(Inspection.id.desc()).limit(query.limit)
    with sessions() as session:
        rows = list(session.scalars(statement))
        latest = _latest_module_decisions(session, [r.id for r in rows])
        shadows = _shadow_results(session, [r.id for r in rows])
    return [
        QueueItem(r, r.verdict == ModuleVerdict.PASS.value, latest.get(r.id), shadows.get(r.id)) for r in rows
    ]


def _shadow_results(session: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
    if not ids:
        return {}
    statement = select(ShadowResult).where(ShadowResult.inspection_id.in_(ids)).order_by(ShadowResult.id)
    return {  # later ids overwrite: the latest shadow's judgement
        s.inspection_id: {
            "model_version": s.model_version,
            "verdict": s.verdict,
            "disagrees": s.disagrees,
            "disagreeing_cells": [[c["row"], c["col"]] for c in s.cells if c.get("disagrees")],
        }
        for s in session.scalars(statement)
    }


def pending_count(sessions: sessionmaker[Session], line_id: str, sample_rate: float) -> int:
    statement = (
        select(func.count(Inspection.id))
        .where(Inspection.line_id == line_id, in_queue(sample_rate))
        .where(~has_module_decision())
    )
    with sessions() as session:
        return int(session.scalar(statement) or 0)


def _latest_module_decisions(session: Session, ids: list[int]) -> dict[int, dict[str, Any]]:
    if not ids:
        return {}
    statement = (
        select(ReviewDecision)
        .where(ReviewDecision.inspection_id.in_(ids), ReviewDecision.target == Target.MODULE.value)
        .order_by(ReviewDecision.id)
    )
    return {d.inspection_id: d.after for d in session.scalars(statement)}  # later ids overwrite


# -- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellChange:
    row: int
    col: int
    label: CellLabel
    defect_type: DefectType | None


@dataclass(frozen=True)
class Decision:
    module: ReviewedVerdict | None
    cells: list[CellChange]
    note: str | None


def model_module_label(inspection: Inspection) -> dict[str, Any]:
    return {"verdict": inspection.verdict, "source": "model"}


def model_cell_label(verdict: str, probability: float) -> dict[str, Any]:
    return {"label": verdict, "probability": round(probability, 4), "source": "model"}


def cell_key(row: int | None, col: int | None) -> str:
    return f"{row},{col}"


@dataclass
class EffectiveLabels:
    """The label in force for a module and each of its cells: the latest decision, else the model's."""

    module: dict[str, Any]
    cells: dict[str, dict[str, Any]]  # "row,col" -> label
    decided_module: ReviewDecision | None
    decided_cells: dict[str, ReviewDecision]


def effective_labels(session: Session, inspection: Inspection) -> EffectiveLabels:
    labels = EffectiveLabels(
        module=model_module_label(inspection),
        cells={cell_key(c.row, c.col): model_cell_label(c.verdict, c.probability) for c in inspection.cells},
        decided_module=None,
        decided_cells={},
    )
    statement = (
        select(ReviewDecision)
        .where(ReviewDecision.inspection_id == inspection.id)
        .order_by(ReviewDecision.id)
    )
    for decision in session.scalars(statement):
        if decision.target == Target.MODULE.value:
            labels.module, labels.decided_module = decision.after, decision
        else:
            key = cell_key(decision.row, decision.col)
            labels.cells[key], labels.decided_cells[key] = decision.after, decision
    return labels


def record_decision(
    sessions: sessionmaker[Session], inspection_id: int, decision: Decision, reviewer: str
) -> list[ReviewDecision]:
    """Append one row per changed target, in one transaction; `before` is what was in force.

    Decisions on one inspection take turns: two engineers saving at once would otherwise both read
    the model's label as `before`, and the second would overwrite the first unseen. PostgreSQL locks
    the inspection's row until the commit; SQLite (embedded mode: one process) takes a lock here.
    """
    with _one_writer(sessions, inspection_id), sessions() as session:
        inspection = session.scalars(
            select(Inspection)
            .options(selectinload(Inspection.cells))
            .where(Inspection.id == inspection_id)
            .with_for_update(of=Inspection)
        ).first()
        if inspection is None:
            raise DecisionRefusedError(f"no inspection {inspection_id}", 404)
        current = effective_labels(session, inspection)
        now = utcnow()
        rows: list[ReviewDecision] = []
        if decision.module is not None:
            verdict = {"verdict": decision.module.value, "source": "review"}
            rows.append(
                _decision_row(
                    inspection_id,
                    Target.MODULE,
                    None,
                    None,
                    current.module,
                    verdict,
                    decision.note,
                    reviewer,
                    now,
                )
            )
        seen: set[str] = set()
        for change in decision.cells:
            key = cell_key(change.row, change.col)
            if key not in current.cells:
                raise DecisionRefusedError(
                    f"inspection {inspection_id} has no cell at row {change.row}, col {change.col} "
                    f"(its grid is {inspection.rows}x{inspection.cols})"
                )
            if key in seen:
                raise DecisionRefusedError(f"cell row {change.row}, col {change.col} appears twice")
            seen.add(key)
            after: dict[str, Any] = {
                "label": change.label.value,
                "defect_type": change.defect_type.value if change.defect_type else None,
                "source": "review",
            }
            rows.append(
                _decision_row(
                    inspection_id,
                    Target.CELL,
                    change.row,
                    change.col,
                    current.cells[key],
                    after,
                    decision.note,
                    reviewer,
                    now,
                )
            )
        session.add_all(rows)
        session.commit()
        for row in rows:
            session.refresh(row)
        return rows


# striped by inspection id: decisions on one module take turns, decisions on others rarely wait
_SQLITE_DECISIONS = tuple(threading.Lock() for _ in range(64))


def _one_writer(
    sessions: sessionmaker[Session], inspection_id: int
) -> contextlib.AbstractContextManager[object]:
    """SQLite ignores FOR UPDATE: one process serves it (embedded mode), so a lock in it serialises."""
    bind = sessions.kw.get("bind")
    if bind is not None and bind.dialect.name == "sqlite":
        return _SQLITE_DECISIONS[inspection_id % len(_SQLITE_DECISIONS)]
    return contextlib.nullcontext()


def _decision_row(
    inspection_id: int,
    target: Target,
    row: int | None,
    col: int | None,
    before: dict[str, Any],
    after: dict[str, Any],
    note: str | None,
    reviewer: str,
    now: datetime,
) -> ReviewDecision:
    return ReviewDecision(
        inspection_id=inspection_id,
        target=target.value,
        row=row,
        col=col,
        before=before,
        after={k: (v.value if isinstance(v, enum.Enum) else v) for k, v in after.items()},
        note=note,
        reviewer=reviewer,
        created_at=now,
    )


# -- reads --------------------------------------------------------------------------------------


def inspection_with_labels(
    sessions: sessionmaker[Session], inspection_id: int
) -> tuple[Inspection, EffectiveLabels, list[ReviewDecision]] | None:
    with sessions() as session:
        inspection = session.scalars(
            select(Inspection).options(selectinload(Inspection.cells)).where(Inspection.id == inspection_id)
        ).first()
        if inspection is None:
            return None
        labels = effective_labels(session, inspection)
        history = list(
            session.scalars(
                select(ReviewDecision)
                .where(ReviewDecision.inspection_id == inspection_id)
                .order_by(ReviewDecision.id)
            )
        )
        return inspection, labels, history


@dataclass(frozen=True)
class AuditQuery:
    inspection_id: int | None = None
    reviewer: str | None = None
    line_id: str | None = None
    since: datetime | None = None
    after_id: int | None = None  # keyset cursor: oldest first, ids above this one
    limit: int = 100


def audit_trail(sessions: sessionmaker[Session], query: AuditQuery) -> list[ReviewDecision]:
    statement = select(ReviewDecision).order_by(ReviewDecision.id).limit(query.limit)
    if query.inspection_id is not None:
        statement = statement.where(ReviewDecision.inspection_id == query.inspection_id)
    if query.reviewer is not None:
        statement = statement.where(ReviewDecision.reviewer == query.reviewer)
    if query.line_id is not None:
        statement = statement.where(
            ReviewDecision.inspection_id.in_(select(Inspection.id).where(Inspection.line_id == query.line_id))
        )
    if query.since is not None:
        statement = statement.where(ReviewDecision.created_at >= query.since)
    if query.after_id is not None:
        statement = statement.where(ReviewDecision.id > query.after_id)
    with sessions() as session:
        return list(session.scalars(statement))


@dataclass(frozen=True)
class ReviewedModule:
    inspection: Inspection
    labels: EffectiveLabels


def reviewed_labels(
    sessions: sessionmaker[Session], line_id: str | None, after_inspection: int | None, limit: int
) -> list[ReviewedModule]:
    """Effective labels of reviewed inspections (any decision), oldest inspection first."""
    ids = select(ReviewDecision.inspection_id).distinct()
    if after_inspection is not None:
        ids = ids.where(ReviewDecision.inspection_id > after_inspection)
    if line_id is not None:
        ids = ids.where(
            ReviewDecision.inspection_id.in_(select(Inspection.id).where(Inspection.line_id == line_id))
        )
    ids = ids.order_by(ReviewDecision.inspection_id).limit(limit)
    with sessions() as session:
        inspections = session.scalars(
            select(Inspection)
            .options(selectinload(Inspection.cells))
            .where(Inspection.id.in_(ids))
            .order_by(Inspection.id)
        ).all()
        return [ReviewedModule(i, effective_labels(session, i)) for i in inspections]
