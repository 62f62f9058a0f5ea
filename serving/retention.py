"""Frame retention: the opt-in pass that deletes the frame files of old, unremarkable PASS modules.

Owns: which inspections' frames may go (`prunable`: verdict PASS, older than
`frame_retention_days`, not in the review queue, so neither flagged nor in the PASS sample, and
without any review decision), the pass that deletes them one sha256 at a time, and `FramePruner`, the
background task that runs the pass at start and every `frame_retention_interval_seconds`. With
`frame_retention_days` unset (the default) nothing here runs and every frame is kept. Flagged
(REVIEW, FAIL) and reviewed modules' frames are always kept: engineers review them and retraining
cuts its cells from them (serving/export_reviewed.py).

A pruned row keeps its verdict and cells; `frame_pruned_at` says when its file went, and the readers
answer 410 (serving/views.py `stored_frame_path`). Identical bytes are stored once for all their rows,
so a file goes only when no kept row (one not pruned in the same step) references its sha256.

`would_prune` is the dry run (`pvqc prune-frames --dry-run`): what a pass would delete now, counted
with the pass's own rule (`marks`, `candidate_digests`, `needs_the_bytes`) by reads only, so it is safe
beside a running service; rows and files it counts may of course change before a pass runs.

Race safety, per digest, in one transaction: mark the digest's prunable rows (an UPDATE: on SQLite
this takes the database's write lock), take the digest's frame lock (`serving.store.lock_frame`: on
PostgreSQL an advisory lock across replicas), check that no unmarked row references the digest,
delete the file, commit. An insert of identical bytes holds the same lock from before it publishes
its frame until its commit (`serving.store.insert_inspection`), so either the insert commits first
and the pass, under the lock, sees a recent row and keeps the file, or the pass commits first and the
insert, finding the file gone, writes the bytes again before its commit. The file is deleted before
the pass's commit, while the lock is held: deleted after it, an insert could have found the file,
published and committed in between. On PostgreSQL one replica at a time runs a pass
(`one_pass_at_a_time`); the per-digest steps are safe without that, it only saves the others the work.
All functions here but `FramePruner`'s block.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, CursorResult, and_, case, exists, func, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from serving.db import Inspection, ReviewDecision, utcnow
from serving.images import ImageType
from serving.review import in_queue
from serving.settings import Settings
from serving.store import FRAME_LOCK_SPACE, FrameStore, lock_frame
from serving.verdicts import ModuleVerdict

log = logging.getLogger(__name__)

# the pass-wide lock of one_pass_at_a_time: PostgreSQL's two-int4 advisory keys of another space than
# the frames' (serving.store.FRAME_LOCK_SPACE), so no frame's key can ever meet it
PASS_LOCK_SPACE = FRAME_LOCK_SPACE + 1
PAGE = 500  # digests read per query: a first pass over a year of frames walks them page by page
REPORT_EVERY = 10_000  # a long pass (the first after turning retention on) says how far it got

Observe = Callable[[int, int], None]  # (frames deleted, bytes freed), e.g. ServiceMetrics.observe_pruned


@dataclass(frozen=True)
class PruneResult:
    frames: int = 0  # files deleted
    bytes: int = 0  # their sizes
    rows: int = 0  # inspections marked pruned
    kept_shared: int = 0  # digests left alone: a kept row references the same bytes
    failed: int = 0  # digests whose file could not be deleted (nothing marked; tried next pass)
    skipped: bool = False  # no pass ran: another replica was running one (PostgreSQL)

    def __add__(self, other: PruneResult) -> PruneResult:
        return PruneResult(
            self.frames + other.frames,
            self.bytes + other.bytes,
            self.rows + other.rows,
            self.kept_shared + other.kept_shared,
            self.failed + other.failed,
            self.skipped or other.skipped,
        )


def retention_cutoff(now: datetime, days: int) -> datetime:
    return now - timedelta(days=days)


def prunable(cutoff: datetime, sample_rate: float) -> ColumnElement[bool]:
    """An inspection whose frame the policy lets go: PASS, older than `cutoff`, not in the review
    queue (with the sample rate in force now) and never reviewed (any decision, module or cell)."""
    return and_(
        Inspection.verdict == ModuleVerdict.PASS.value,
        Inspection.created_at < cutoff,
        ~in_queue(sample_rate),
        ~exists().where(ReviewDecision.inspection_id == Inspection.id),
    )


def marks(cutoff: datetime, sample_rate: float) -> ColumnElement[bool]:
    """The rows a pass marks pruned: prunable ones that still hold their frame."""
    return and_(Inspection.frame_pruned_at.is_(None), prunable(cutoff, sample_rate))


def needs_the_bytes(cutoff: datetime, sample_rate: float, marked: ColumnElement[bool]) -> ColumnElement[bool]:
    """The shared-bytes check: a row that keeps its frame's file on disk. That is a row not `marked`
    pruned (in this step or before) and a marked one that is no longer prunable.

    The pass asks it after its marks (`marked`: `frame_pruned_at` is set); the dry run, which marks
    nothing, counts the rows the pass would mark as marked. Marking a prunable row leaves it prunable
    (it was outside the review queue, and a pruned row never enters it), so both ask the same question.
    """
    return or_(~marked, ~prunable(cutoff, sample_rate))


def candidate_digests(
    sessions: sessionmaker[Session], cutoff: datetime, sample_rate: float, after: str, limit: int = PAGE
) -> list[str]:
    """Digests above `after` (keyset order) of prunable rows that still hold their frame.

    A digest shared with a kept row stays a candidate; the locked check leaves it alone, and the
    keyset moves past it, so a pass always ends.
    """
    statement = (
        select(Inspection.frame_sha256)
        .where(marks(cutoff, sample_rate))
        .where(Inspection.frame_sha256 > after)
        .distinct()
        .order_by(Inspection.frame_sha256)
        .limit(limit)
    )
    with sessions() as session:
        return list(session.scalars(statement))


def prune_digest(
    sessions: sessionmaker[Session], frames: FrameStore, digest: str, cutoff: datetime, sample_rate: float
) -> PruneResult:
    """Delete one digest's frame file(s) if every row that references it is prunable; mark those rows.

    One transaction, in this order (the module docstring says why): mark, lock, check, delete, commit.
    An OSError from the deletion rolls the marks back and propagates.
    """
    with sessions() as session:
        result = session.execute(
            update(Inspection)
            .where(Inspection.frame_sha256 == digest, marks(cutoff, sample_rate))
            .values(frame_pruned_at=utcnow()),
            execution_options={"synchronize_session": False},  # no SELECT before the UPDATE (SQLite lock)
        )
        marked = result.rowcount if isinstance(result, CursorResult) else 0
        if not marked:  # pruned meanwhile (another replica's pass), or no longer prunable
            session.rollback()
            return PruneResult()
        lock_frame(session, digest)
        # under the lock and after the marks, in a statement of its own (READ COMMITTED, pinned in
        # serving.db.make_engine, reads what was committed meanwhile): a row still unmarked is kept,
        # and so is a marked one that is no longer prunable. The UPDATE re-checked only the row itself
        # after waiting on its lock, not the decision a reviewer committed while holding that lock
        kept = session.scalar(
            select(func.count(Inspection.id)).where(
                Inspection.frame_sha256 == digest,
                needs_the_bytes(cutoff, sample_rate, Inspection.frame_pruned_at.is_not(None)),
            )
        )
        if kept:
            session.rollback()
            return PruneResult(kept_shared=1)
        content_types = session.scalars(
            select(Inspection.frame_content_type).where(Inspection.frame_sha256 == digest).distinct()
        ).all()
        deleted, freed = delete_frame_files(frames, digest, content_types)
        try:
            session.commit()
        except BaseException:
            # the files are gone and the rows unmarked: they read as "no longer stored" until the next
            # pass marks them (it finds them prunable still, and their files already gone)
            log.warning("frame %s was deleted; marking its %d inspection(s) pruned failed", digest, marked)
            raise
        return PruneResult(frames=deleted, bytes=freed, rows=marked)


def delete_frame_files(frames: FrameStore, digest: str, content_types: Sequence[str]) -> tuple[int, int]:
    """(files deleted, bytes freed). The fan-out folders stay: a request may be staging into them.

    No folder fsync: a deletion that a power loss undoes leaves a file its rows call pruned, which
    costs disk, not correctness.
    """
    deleted = freed = 0
    for path, size in frame_files(frames, digest, content_types):
        try:
            path.unlink()
        except FileNotFoundError:  # deleted meanwhile, by hand
            continue
        deleted += 1
        freed += size
    return deleted, freed


def frame_files(frames: FrameStore, digest: str, content_types: Sequence[str]) -> list[tuple[Path, int]]:
    """The digest's frame files on disk, with their sizes: those a pass would delete."""
    found = []
    for content_type in content_types:
        path = frames.path_for(digest, ImageType(content_type).extension)
        try:
            found.append((path, path.stat().st_size))
        except FileNotFoundError:  # deleted by a pass whose commit failed, or by hand
            continue
    return found


def delete_previews(previews: Path, digest: str) -> None:
    """The JPEG previews made of a pruned frame (serving/views.py PreviewCache): a cache, so no lock."""
    for preview in previews.glob(f"{digest}-*.jpg"):
        with contextlib.suppress(OSError):
            preview.unlink()


@contextlib.contextmanager
def one_pass_at_a_time(sessions: sessionmaker[Session]) -> Iterator[bool]:
    """Whether this replica may run a pass now (yielded), held until the pass ends.

    PostgreSQL: replicas sharing the database run their passes at the same hour and would walk the
    same digests in the same order, each waiting on the others' marks; a session-level advisory lock
    (on a connection of its own, in a key space apart from the frames') lets one pass run and the
    others skip theirs. SQLite: always (the service's pruner and a `pvqc prune-frames` beside it may
    both run: each digest's step holds the write lock, so they only take turns).
    """
    bind = sessions.kw.get("bind")
    if bind is None or bind.dialect.name != "postgresql":
        yield True
        return
    key = {"space": PASS_LOCK_SPACE, "key": 0}
    with bind.connect() as connection:
        mine = bool(connection.scalar(text("SELECT pg_try_advisory_lock(:space, :key)"), key))
        connection.commit()  # the lock is the session's: it outlives this transaction
        try:
            yield mine
        finally:
            if mine:  # or the pooled connection would keep it
                connection.execute(text("SELECT pg_advisory_unlock(:space, :key)"), key)
                connection.commit()


def prune_frames(
    sessions: sessionmaker[Session],
    frames: FrameStore,
    days: int,
    sample_rate: float,
    *,
    now: datetime | None = None,
    previews: Path | None = None,
    observe: Observe | None = None,
    stop: threading.Event | None = None,
) -> PruneResult:
    """One retention pass over every prunable frame older than `days`; `stop` ends it between digests."""
    cutoff = retention_cutoff(now or utcnow(), days)
    with one_pass_at_a_time(sessions) as mine:
        if not mine:
            log.info("frame retention pass skipped: another replica is running one")
            return PruneResult(skipped=True)
        return _prune_all(sessions, frames, cutoff, sample_rate, previews, observe, stop)


def _prune_all(
    sessions: sessionmaker[Session],
    frames: FrameStore,
    cutoff: datetime,
    sample_rate: float,
    previews: Path | None,
    observe: Observe | None,
    stop: threading.Event | None,
) -> PruneResult:
    total = PruneResult()
    after = ""  # below every hex digest
    reported = 0
    while digests := candidate_digests(sessions, cutoff, sample_rate, after):
        for digest in digests:
            if stop is not None and stop.is_set():
                log.info("frame retention stopped: %s", describe(total))
                return total
            try:
                result = prune_digest(sessions, frames, digest, cutoff, sample_rate)
            except OSError:
                log.warning(
                    "frame %s could not be deleted; it is kept until the next pass", digest, exc_info=True
                )
                result = PruneResult(failed=1)
            if result.frames and observe is not None:
                observe(result.frames, result.bytes)
            if result.rows and previews is not None:
                delete_previews(previews, digest)
            total += result
        after = digests[-1]
        if total.rows - reported >= REPORT_EVERY:
            reported = total.rows
            log.info("frame retention under way: %s", describe(total))
    log.info(
        "frame retention pass (PASS frames before %s): %s",
        cutoff.isoformat(timespec="seconds"),
        describe(total),
    )
    return total


def would_prune(
    sessions: sessionmaker[Session],
    frames: FrameStore,
    days: int,
    sample_rate: float,
    *,
    now: datetime | None = None,
    stop: threading.Event | None = None,
) -> PruneResult:
    """The dry run: what `prune_frames` with these arguments would delete now, by reads only.

    The pass's walk (`candidate_digests`) and, per digest, its marks (`marks`) and its shared-bytes
    check (`needs_the_bytes`, the rows the pass would mark counted as marked), a page of digests per
    query; the files it would delete are those on disk now. Nothing is marked, locked or deleted, so
    it is safe beside a running service, and a pass run later may find what changed meanwhile.
    `stop` ends it between pages (the result then counts the pages done).
    """
    cutoff = retention_cutoff(now or utcnow(), days)
    marked = marks(cutoff, sample_rate)
    kept = needs_the_bytes(cutoff, sample_rate, or_(Inspection.frame_pruned_at.is_not(None), marked))
    total = PruneResult()
    after = ""
    while digests := candidate_digests(sessions, cutoff, sample_rate, after):
        if stop is not None and stop.is_set():
            log.info("frame retention dry run stopped: %s", describe(total))
            return total
        with sessions() as session:
            counts = {
                digest: (marking, keeping)
                for digest, marking, keeping in session.execute(
                    select(
                        Inspection.frame_sha256,
                        func.count(case((marked, 1))),
                        func.count(case((kept, 1))),
                    )
                    .where(Inspection.frame_sha256.in_(digests))
                    .group_by(Inspection.frame_sha256)
                ).tuples()
            }
            content_types: dict[str, list[str]] = {}
            for digest, content_type in session.execute(
                select(Inspection.frame_sha256, Inspection.frame_content_type)
                .where(Inspection.frame_sha256.in_(digests))
                .distinct()
            ).tuples():
                content_types.setdefault(digest, []).append(content_type)
        for digest in digests:
            rows, keeping = counts.get(digest, (0, 0))
            if not rows:  # pruned or no longer prunable since the page was read: the pass skips it too
                continue
            if keeping:
                total += PruneResult(kept_shared=1)
                continue
            files = frame_files(frames, digest, content_types.get(digest, []))
            total += PruneResult(frames=len(files), bytes=sum(size for _, size in files), rows=rows)
        after = digests[-1]
    log.info(
        "frame retention dry run (PASS frames before %s), nothing changed; a pass now: %s",
        cutoff.isoformat(timespec="seconds"),
        describe(total),
    )
    return total


def describe(result: PruneResult) -> str:
    summary = (
        f"{result.frames} frame(s), {result.bytes} bytes ({result.bytes / 2**20:.1f} MiB) pruned, "
        f"{result.rows} inspection(s) marked"
    )
    if result.kept_shared:
        summary += f", {result.kept_shared} frame(s) kept for rows that still need the same bytes"
    if result.failed:
        summary += f", {result.failed} frame(s) could not be deleted"
    return summary


class FramePruner:
    """Runs `prune_frames` at start and every `frame_retention_interval_seconds`, in a worker thread.

    Stopping asks the pass to end after the digest in hand and waits for its thread: a transaction
    must not outlive the service's engine (it is disposed next).
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        frames: FrameStore,
        settings: Settings,
        previews: Path | None = None,
        observe: Observe | None = None,
    ) -> None:
        if settings.frame_retention_days is None:
            raise ValueError("FramePruner needs frame_retention_days; unset, every frame is kept")
        self.sessions = sessions
        self.frames = frames
        self.settings = settings
        self.days = settings.frame_retention_days
        self.previews = previews
        self.observe = observe
        self.passes = 0  # passes finished since start
        self.last: PruneResult | None = None
        self._stop = threading.Event()
        self._task: asyncio.Task[None] | None = None
        self._running: asyncio.Future[PruneResult] | None = None  # the pass's thread, if one runs

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name="pvqc-frame-retention")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._running is not None:
            await asyncio.wait([self._running])
            if not self._running.cancelled() and self._running.exception() is not None:
                # retrieved here, or asyncio reports it as never retrieved; the pass logged nothing yet
                log.warning(
                    "the frame retention pass ended in an error at shutdown: %r", self._running.exception()
                )

    async def run_once(self) -> PruneResult:
        """One pass, off the event loop."""
        self._running = asyncio.get_running_loop().run_in_executor(None, self._pass)
        # shielded: a cancelled caller must not lose track of the thread (stop() waits for it)
        result = await asyncio.shield(self._running)
        self.passes += 1
        self.last = result
        return result

    def _pass(self) -> PruneResult:
        return prune_frames(
            self.sessions,
            self.frames,
            self.days,
            self.settings.review_pass_sample_rate,
            previews=self.previews,
            observe=self.observe,
            stop=self._stop,
        )

    async def _run_forever(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await self.run_once()
            except Exception:  # a database outage must not end retention for good
                failures += 1
                if failures == 1:  # the traceback once; an outage's every retry would flood the log
                    log.exception("frame retention pass failed; retrying in %.0f s", self.interval)
                else:
                    log.warning("frame retention pass failed again (%d in a row)", failures)
            else:
                failures = 0
            await asyncio.sleep(self.interval)

    @property
    def interval(self) -> float:
        return self.settings.frame_retention_interval_seconds
