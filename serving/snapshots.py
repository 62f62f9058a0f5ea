"""What the shop-floor screen shows for one line, computed from the database in a few queries.

Owns: a line's snapshot (pass rate over the last N modules, the last hour and the current shift;
counts; reviews pending; the shift's trend in fixed time buckets; the last failed modules with
their defective cells' outlines) and its alarm state: the pass rate below the line's floor, or no
frame for longer than its takt, both only during a shift the line has worked (a line stopped since
an earlier shift is idle, whatever its last modules were). The snapshot is plain JSON,
whole, so a screen that receives it needs nothing earlier (which makes resuming a stream simple).
Blocking: called from a worker thread.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import BigInteger, ColumnElement, Integer, cast, func, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from model.card import CellVerdict
from serving.db import Inspection
from serving.review import pending_count
from serving.settings import LineConfig, Settings, shift_end, shift_start
from serving.verdicts import InspectionKind, ModuleVerdict


class AlarmState(enum.StrEnum):
    OK = "ok"
    IDLE = "idle"  # no module yet in this shift: nothing to judge, nothing to alarm on
    ALARM = "alarm"


class AlarmKind(enum.StrEnum):
    LOW_PASS_RATE = "low_pass_rate"
    NO_FRAMES = "no_frames"


def line_snapshot(
    sessions: sessionmaker[Session], settings: Settings, line_id: str, now: datetime
) -> dict[str, Any]:
    line = settings.lines[line_id]
    zone = settings.zone
    shift = shift_start(line, now, zone)
    bucket = settings.trend_bucket_minutes * 60
    with sessions() as session:
        last = _last_n(session, line_id, settings.stats_default_last)
        hour = _counts(session, line_id, now - timedelta(hours=1))
        trend, shift_counts = _trend(session, line_id, shift, bucket)
        last_at = session.scalar(select(func.max(Inspection.created_at)).where(_modules_of(line_id)))
        failed = _failed(session, line_id, settings.failed_thumbnails)
    pending = pending_count(sessions, line_id, settings.review_pass_sample_rate)
    windows = {"last": _window(last), "hour": _window(hour), "shift": _window(shift_counts)}
    alarm = _alarm(line, windows, last_at, shift, now)
    return {
        "line_id": line_id,
        "name": line.name or line_id,
        "pass_rate_floor": line.pass_rate_floor,
        "takt_seconds": line.takt_seconds,
        "last_n": settings.stats_default_last,
        "shift_start": shift.astimezone(UTC).isoformat(),
        "shift_end": shift_end(line, shift, zone).astimezone(UTC).isoformat(),
        "bucket_seconds": bucket,
        "windows": windows,
        "reviews_pending": pending,
        "last_at": last_at.astimezone(UTC).isoformat() if last_at else None,
        "alarm": alarm,
        "trend": trend,
        "failed": failed,
    }


def _modules_of(line_id: str) -> ColumnElement[bool]:
    return (Inspection.line_id == line_id) & (Inspection.kind == InspectionKind.MODULE.value)


def _empty() -> dict[str, int]:
    return {v.value: 0 for v in ModuleVerdict}


def _last_n(session: Session, line_id: str, n: int) -> dict[str, int]:
    recent = (
        select(Inspection.verdict)
        .where(_modules_of(line_id))
        .order_by(Inspection.id.desc())
        .limit(n)
        .subquery()
    )
    counts = _empty()
    for verdict, count in session.execute(select(recent.c.verdict, func.count()).group_by(recent.c.verdict)):
        counts[str(verdict)] = int(count)
    return counts


def _counts(session: Session, line_id: str, since: datetime) -> dict[str, int]:
    statement = (
        select(Inspection.verdict, func.count())
        .where(_modules_of(line_id), Inspection.created_at >= since)
        .group_by(Inspection.verdict)
    )
    counts = _empty()
    for verdict, count in session.execute(statement):
        counts[str(verdict)] = int(count)
    return counts


def _epoch_seconds(session: Session) -> ColumnElement[int]:
    # the one dialect difference in the service: seconds since 1970 of a stored timestamp
    if session.get_bind().dialect.name == "sqlite":
        return cast(func.strftime("%s", Inspection.created_at), Integer)
    return cast(func.floor(func.extract("epoch", Inspection.created_at)), BigInteger)


def _trend(
    session: Session, line_id: str, shift: datetime, bucket: int
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Pass rate per time bucket since the shift began, and the shift's totals (their sum)."""
    slot = _epoch_seconds(session) // bucket  # floor division: `/` is true division in SQLAlchemy 2
    statement = (
        select(slot, Inspection.verdict, func.count())
        .where(_modules_of(line_id), Inspection.created_at >= shift)
        .group_by(slot, Inspection.verdict)
    )
    buckets: dict[int, dict[str, int]] = {}
    totals = _empty()
    for index, verdict, count in session.execute(statement):
        buckets.setdefault(int(index), _empty())[str(verdict)] += int(count)
        totals[str(verdict)] += int(count)
    trend = []
    for index in sorted(buckets):
        counts = buckets[index]
        modules = sum(counts.values())
        trend.append(
            {
                "t": datetime.fromtimestamp(index * bucket, UTC).isoformat(),
                "modules": modules,
                "pass_rate": counts[ModuleVerdict.PASS] / modules,
            }
        )
    return trend, totals


def _failed(session: Session, line_id: str, limit: int) -> list[dict[str, Any]]:
    if limit == 0:
        return []
    statement = (
        select(Inspection)
        .options(selectinload(Inspection.cells))
        .where(_modules_of(line_id), Inspection.verdict == ModuleVerdict.FAIL.value)
        .order_by(Inspection.id.desc())
        .limit(limit)
    )
    return [
        {
            "inspection_id": row.id,
            "serial": row.serial,
            "created_at": row.created_at.isoformat(),
            "width": row.frame_width,
            "height": row.frame_height,
            "rows": row.rows,
            "cols": row.cols,
            "defective": [
                {"row": c.row, "col": c.col, "polygon": c.polygon}
                for c in row.cells
                if c.verdict == CellVerdict.DEFECTIVE.value
            ],
        }
        for row in session.scalars(statement)
    ]


def _window(counts: dict[str, int]) -> dict[str, Any]:
    modules = sum(counts.values())
    return {
        "modules": modules,
        "counts": counts,
        "pass_rate": counts[ModuleVerdict.PASS] / modules if modules else None,
    }


def _alarm(
    line: LineConfig, windows: dict[str, Any], last_at: datetime | None, shift: datetime, now: datetime
) -> dict[str, Any]:
    reasons = []
    # both alarms judge a line at work: the last-N window of a line stopped since an earlier shift is
    # history, and alarming on it would hold ALARM on an idle line until N new modules arrive
    worked_this_shift = last_at is not None and last_at >= shift
    rate = windows["last"]["pass_rate"]
    if worked_this_shift and rate is not None and rate < line.pass_rate_floor:
        reasons.append(
            {
                "kind": AlarmKind.LOW_PASS_RATE.value,
                "message": f"pass rate {rate:.0%} is below the floor of {line.pass_rate_floor:.0%}",
            }
        )
    if worked_this_shift and last_at is not None:
        silent = (now - last_at).total_seconds()
        if silent > line.takt_seconds:
            reasons.append(
                {
                    "kind": AlarmKind.NO_FRAMES.value,
                    # no running seconds in the text: the snapshot stays equal, and is not re-sent, while
                    # the alarm lasts; the screen counts the time since `since` itself
                    "message": f"no frame for longer than the takt of {line.takt_seconds:g} s",
                    "since": (last_at + timedelta(seconds=line.takt_seconds)).astimezone(UTC).isoformat(),
                }
            )
    if reasons:
        state = AlarmState.ALARM
    elif not worked_this_shift:
        state = AlarmState.IDLE
    else:
        state = AlarmState.OK
    return {"state": state.value, "reasons": reasons}
