"""Durable storage of inspections: content-addressed frame files and the database rows.

Owns: writing a frame file in two steps (staged: written and fsynced under a private name in its
final folder; published: renamed to its content-addressed name and the folder fsynced, after which
the bytes survive kill -9 and power loss; a failed write removes its private file), the idempotent
insert keyed on (line, serial, frame id) that publishes the frame only once its row is certain, and
the read queries (lists, one inspection, pass-rate statistics).

Requests never delete a content-addressed frame: another row with identical bytes may reference it,
or be about to. A request that loses (a concurrent twin, a failed insert) removes only its own staged
file, which nothing else can name. Only the opt-in retention pass (serving/retention.py) deletes
stored frames, one sha256 at a time under that digest's frame lock (`lock_frame`), which the insert
also holds from before it publishes until its commit: a pass that deleted a file which a new row's
staging had found already stored is seen at publish time, and the bytes are written again.
All functions here block: routes call them through `anyio.to_thread`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from serving.db import Inspection
from serving.verdicts import InspectionKind, ModuleVerdict

log = logging.getLogger(__name__)


# advisory locks of frames live in a key space of their own: PostgreSQL's two-int4 form never meets
# the single-bigint keys (serving.db.upgrade_head's migration lock)
FRAME_LOCK_SPACE = 0x70766671  # "pvfq"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def frame_lock_key(digest: str) -> int:
    """The int4 advisory lock key of a frame: its digest's first 32 bits (a collision only makes two
    unrelated frames take turns)."""
    return int.from_bytes(bytes.fromhex(digest[:8]), "big", signed=True)


def lock_frame(session: Session, digest: str) -> None:
    """Hold `digest`'s frame lock until the session's transaction ends.

    The insert holds it from before it publishes until its commit; the retention pass holds it while
    it checks, marks and deletes. PostgreSQL: a transaction-scoped advisory lock, across replicas.
    SQLite: nothing to take here: the transaction has already written (the insert's flush, the
    pass's UPDATE), so it holds the database's single write lock, which every writer waits for.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            text("SELECT pg_advisory_xact_lock(:space, :key)"),
            {"space": FRAME_LOCK_SPACE, "key": frame_lock_key(digest)},
        )


class StagedFrame:
    """A frame on its way into the store: written and fsynced under a private name beside `path`.

    Owns the last two steps of one frame write: `publish` gives it its content-addressed name,
    `discard` removes the private file. `temporary` is None when identical bytes were stored already
    (then there is nothing to discard: a stored file is never removed by a request). Such a frame
    keeps its bytes (`data`, the request's own body, not a copy) until it is published: the retention
    pass may delete the stored file before this row's commit, and then they are written again.
    """

    def __init__(self, path: Path, temporary: Path | None, data: bytes | None = None) -> None:
        self.path = path
        self.temporary = temporary
        self.data = data

    def publish(self) -> Path:
        """Rename the private file to its content-addressed name and make the rename durable.

        The caller holds the digest's frame lock (`lock_frame`): a file found stored when staging and
        gone now was pruned meanwhile, and no pass can delete it again before the caller's commit.
        """
        if self.temporary is None:
            if self.data is None or self.path.exists():
                # stored before, perhaps by a request that renamed it an instant ago and is still in
                # its folder fsync: this row must not commit before that name is durable, so sync again
                self.data = None
                _fsync_dir(self.path.parent)
                return self.path
            log.info("frame %s was pruned after it was staged: writing it again", self.path.name)
            self.temporary = _write_private(self.path, self.data)
        self.data = None
        try:
            # atomic: readers see the whole file or none; a replica that published the same bytes
            # meanwhile is replaced by identical bytes
            self.temporary.replace(self.path)
        except BaseException:
            self.discard()
            raise
        self.temporary = None
        _fsync_dir(self.path.parent)
        return self.path

    def discard(self) -> None:
        """Remove the private file; a published or already stored frame is left alone."""
        self.data = None
        if self.temporary is None:
            return
        # a full or failing disk (ENOSPC, EIO) must not also collect orphans, one per retry; the caller
        # learns the original error, not one from the clean-up
        with contextlib.suppress(OSError):
            self.temporary.unlink(missing_ok=True)
        self.temporary = None


class FrameStore:
    """Frames on disk under `root/ab/cd/<sha256>.<ext>`; identical bytes are stored once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, digest: str, extension: str) -> Path:
        return self.root / digest[:2] / digest[2:4] / f"{digest}.{extension}"

    def stage(self, data: bytes, digest: str, extension: str) -> StagedFrame:
        """Write and fsync the bytes under a private name in their final folder (not yet findable).

        The slow part of a frame write (up to 64 MB and its fsync) happens here, outside any database
        transaction; publishing is then a rename and one folder fsync.
        """
        path = self.path_for(digest, extension)
        if path.exists():
            # stored before: identical bytes need no second copy. The bytes are kept all the same: the
            # retention pass may delete this file before the row is committed (StagedFrame.publish)
            return StagedFrame(path, None, data)
        return StagedFrame(path, _write_private(path, data))


def _write_private(path: Path, data: bytes) -> Path:
    """Write and fsync `data` under a private name beside `path`; on failure no file is left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # the two-level fan-out folders may be new: their names are made durable now, so that
    # publishing needs only the leaf folder's fsync
    _fsync_dir(path.parent.parent)
    _fsync_dir(path.parent.parent.parent)
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.tmp")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        # a full or failing disk (ENOSPC, EIO) must not also collect orphans; the caller learns the
        # original error, not one from the clean-up
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise
    return temporary


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


def insert_inspection(
    sessions: sessionmaker[Session], inspection: Inspection, frame: StagedFrame
) -> tuple[Inspection, bool]:
    """(stored row, created): the row with its published frame, or a concurrent twin's row that won.

    The order keeps both promises: a committed row never lacks its file, and a loser leaves no file.
    The INSERT is flushed first; from then on this transaction holds the row's (line, serial, frame
    id): on PostgreSQL a twin's INSERT waits on the unique index for this commit or rollback (across
    replicas too), on SQLite the database's single write lock makes every writer wait. Only then is
    the staged frame given its content-addressed name, and only after that is the row committed. A
    twin therefore learns it lost only after the winner's commit, with the winner's file in place,
    and it removes only its own staged file. A crash at any step leaves at worst an unreferenced file.

    Before publishing, the transaction takes the digest's frame lock (`lock_frame`), held to the
    commit, which the retention pass takes too: a pass that came first has committed its deletion,
    and publishing writes the bytes again; a pass that comes later sees this committed row (recent,
    so kept) and leaves the file alone.
    """
    with sessions() as session:
        session.add(inspection)
        try:
            session.flush()
        except IntegrityError:
            try:
                session.rollback()
            finally:  # a rollback on a dropped connection raises: the staged file goes all the same
                frame.discard()
            existing = find_existing(sessions, inspection.line_id, inspection.serial, inspection.frame_id)
            if existing is None:
                raise
            return existing, False
        except BaseException:
            frame.discard()
            raise
        try:
            lock_frame(session, inspection.frame_sha256)
        except BaseException:
            frame.discard()
            raise
        frame.publish()  # on failure the session's close rolls the row back
        try:
            session.commit()
        except BaseException:
            # published, and the commit failed or its outcome is unknown (a connection lost during
            # COMMIT): the file may be this row's or another's, so it stays; at worst it is unreferenced
            log.warning("frame %s was stored; its inspection's commit failed or is in doubt", frame.path.name)
            raise
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
