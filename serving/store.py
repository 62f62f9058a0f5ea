"""Durable storage of inspections: content-addressed frame files and the database rows.

Owns: writing a frame file (temp file, fsync, rename, fsync of the folder: after `save_frame`
returns the bytes survive kill -9 and power loss; a failed write removes its temp file), the
idempotent insert keyed on (line, serial, frame id), and the read queries (lists, one inspection,
pass-rate statistics).
All functions here block: routes call them through `anyio.to_thread`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from serving.db import Inspection
from serving.verdicts import InspectionKind, ModuleVerdict


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FrameStore:
    """Frames on disk under `root/ab/cd/<sha256>.<ext>`; identical bytes are stored once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str, extension: str) -> Path:
        return self.root / digest[:2] / digest[2:4] / f"{digest}.{extension}"

    def save(self, data: bytes, digest: str, extension: str) -> Path:
        path = self.path_for(digest, extension)
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{digest}.{uuid.uuid4().hex}.tmp")
        try:
            with temporary.open("wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(path)  # atomic: readers see the whole file or none
        except BaseException:
            # a full or failing disk (ENOSPC, EIO) must not also collect orphans, one per retry; the
            # caller learns the original error, not one from the clean-up
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        _fsync_dir(path.parent.parent)  # the two-level fan-out folders may be new too
        _fsync_dir(path.parent.parent.parent)
        return path


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def find_existing(
    sessions: sessionmaker[Session], line_id: str, serial: str, frame_id: str
) -> Inspection | None:
    with sessions() as session:
        statement = (
            select(Inspection)
            .options(selectinload(Inspection.cells))
            .where(
                Inspection.line_id == line_id, Inspection.serial == serial, Inspection.frame_id == frame_id
            )
        )
        return session.scalars(statement).first()


def insert_inspection(sessions: sessionmaker[Session], inspection: Inspection) -> tuple[Inspection, bool]:
    """(stored row, created); a concurrent twin of the same (line, serial, frame) wins the race."""
    with sessions() as session:
        session.add(inspection)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            existing = find_existing(sessions, inspection.line_id, inspection.serial, inspection.frame_id)
            if existing is None:
                raise
            return existing, False
        session.refresh(inspection)
        _ = inspection.cells  # load before the session closes
        return inspection, True


def get_inspection(sessions: sessionmaker[Session], inspection_id: int) -> Inspection | None:
    with sessions() as session:
        statement = (
            select(Inspection).options(selectinload(Inspection.cells)).where(Inspection.id == inspection_id)
        )
        return session.scalars(statement).first()


@dataclass(frozen=True)
class InspectionQuery:
    line_id: str | None = None
    verdict: ModuleVerdict | None = None
    kind: InspectionKind | None = None
    since: datetime | None = None
    until: datetime | None = None
    before_id: int | None = None  # keyset cursor: newest first, ids below this one
    limit: int = 50


def list_inspections(sessions: sessionmaker[Session], query: InspectionQuery) -> list[Inspection]:
    statement = select(Inspection).order_by(Inspection.id.desc()).limit(query.limit)
    if query.line_id is not None:
        statement = statement.where(Inspection.line_id == query.line_id)
    if query.verdict is not None:
        statement = statement.where(Inspection.verdict == query.verdict.value)
    if query.kind is not None:
        statement = statement.where(Inspection.kind == query.kind.value)
    if query.since is not None:
        statement = statement.where(Inspection.created_at >= query.since)
    if query.until is not None:
        statement = statement.where(Inspection.created_at < query.until)
    if query.before_id is not None:
        statement = statement.where(Inspection.id < query.before_id)
    with sessions() as session:
        return list(session.scalars(statement))


@dataclass(frozen=True)
class PassRate:
    modules: int
    counts: dict[str, int]
    first_at: datetime | None
    last_at: datetime | None

    @property
    def pass_rate(self) -> float | None:
        return self.counts.get(ModuleVerdict.PASS, 0) / self.modules if self.modules else None


def pass_rate(
    sessions: sessionmaker[Session], line_id: str, *, since: datetime | None = None, last: int | None = None
) -> PassRate:
    """Verdict counts over the line's modules since a time, or over its last N modules."""
    statement = select(Inspection.verdict, Inspection.created_at).where(
        Inspection.line_id == line_id, Inspection.kind == InspectionKind.MODULE.value
    )
    if since is not None:
        statement = statement.where(Inspection.created_at >= since)
    statement = statement.order_by(Inspection.id.desc())
    if last is not None:
        statement = statement.limit(last)
    with sessions() as session:
        rows = session.execute(statement).all()
    counts = Counter(str(verdict) for verdict, _ in rows)
    times = [created for _, created in rows]
    return PassRate(
        modules=len(rows),
        counts={v.value: counts.get(v.value, 0) for v in ModuleVerdict},
        first_at=min(times) if times else None,
        last_at=max(times) if times else None,
    )


def count_inspections(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count(Inspection.id))) or 0)
