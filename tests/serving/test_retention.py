"""Frame retention (serving/retention.py): off by default; when on, old PASS frames that nobody flagged,
sampled or reviewed are deleted and their rows marked, every other frame kept, shared bytes kept for
the rows that still need them; readers answer 410 for a pruned frame; an insert of identical bytes
racing the pass always commits with its file on disk, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from pvqc import main as pvqc_main
from serving.app import create_app
from serving.db import Inspection, ReviewDecision, make_engine, upgrade_head, utcnow
from serving.export_reviewed import export_reviewed
from serving.retention import PASS_LOCK_SPACE, PruneResult, prune_frames, would_prune
from serving.review import SAMPLE_MULTIPLIER, SAMPLE_PRIME, SAMPLE_SCALE
from serving.settings import Settings
from serving.store import FrameStore, StagedFrame, insert_inspection, sha256_hex
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, BRIGHT, downgrade, inspection_row, module_frame, png

DAYS = 30  # the retention of these tests; rows are made OLD or NEW relative to it
OLD, NEW = 40.0, 1.0  # ages in days


@dataclass
class Store:
    sessions: sessionmaker[Session]
    frames: FrameStore


@pytest.fixture
def store(database_url: str, tmp_path: Path) -> Iterator[Store]:
    engine = make_engine(database_url)
    try:
        upgrade_head(engine)
        yield Store(sessionmaker(engine, expire_on_commit=False), FrameStore(tmp_path / "frames"))
    finally:
        engine.dispose()  # PostgreSQL: the fixture drops the tables next


def new_row(serial: str, data: bytes, verdict: str = "PASS", age_days: float = OLD) -> Inspection:
    """A module inspection of frame "1" on line L1, `age_days` old, whose frame is `data`."""
    return inspection_row(serial, data, verdict, utcnow() - timedelta(days=age_days))


def insert(store: Store, serial: str, data: bytes, verdict: str = "PASS", age_days: float = OLD) -> int:
    staged = store.frames.stage(data, sha256_hex(data), "png")
    row, created = insert_inspection(store.sessions, new_row(serial, data, verdict, age_days), staged)
    assert created
    return row.id


def frame_path(store: Store, data: bytes) -> Path:
    return store.frames.path_for(sha256_hex(data), "png")


def pruned_at(sessions: sessionmaker[Session], inspection_id: int) -> Any:
    with sessions() as session:
        return session.scalar(select(Inspection.frame_pruned_at).where(Inspection.id == inspection_id))


def review(sessions: sessionmaker[Session], inspection_id: int) -> None:
    with sessions() as session:
        session.add(
            ReviewDecision(
                inspection_id=inspection_id,
                target="cell",  # any decision keeps the frame, a cell's as much as a module's
                row=0,
                col=0,
                before={"label": "functional", "source": "model"},
                after={"label": "defective", "defect_type": "crack", "source": "review"},
                reviewer="eng",
            )
        )
        session.commit()


def sampled(inspection_id: int, rate: float) -> bool:
    """serving.review.in_queue's PASS sample, computed here."""
    return (inspection_id % SAMPLE_PRIME) * SAMPLE_MULTIPLIER % SAMPLE_SCALE < round(rate * SAMPLE_SCALE)


def prune(store: Store, rate: float = 0.0, **options: Any) -> PruneResult:
    return prune_frames(store.sessions, store.frames, DAYS, rate, **options)


# -- the setting ------------------------------------------------------------------------------------


def test_retention_is_off_unless_set_and_must_be_whole_days_from_one_to_a_century(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PVQC_FRAME_RETENTION_DAYS", raising=False)
    assert Settings().frame_retention_days is None
    assert Settings().frame_retention_interval_seconds == 3600.0
    for bad in (0, -5, 1_000_000):
        with pytest.raises(ValidationError, match=rf"from 1 to 36500 .*, got {bad}"):
            Settings(frame_retention_days=bad)
    with pytest.raises(ValidationError, match="valid integer"):
        Settings(frame_retention_days="a month")
    with pytest.raises(ValidationError, match="greater than 0"):
        Settings(frame_retention_interval_seconds=0)
    monkeypatch.setenv("PVQC_FRAME_RETENTION_DAYS", "90")
    assert Settings().frame_retention_days == 90
    monkeypatch.setenv("PVQC_FRAME_RETENTION_DAYS", "")  # an empty ConfigMap value: unset
    assert Settings().frame_retention_days is None


def test_off_by_default_the_service_deletes_no_frame(make_settings: MakeSettings, database_url: str) -> None:
    settings = make_settings(database_url=database_url, review_pass_sample_rate=0.0)
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade_head(engine)
        store = Store(sessionmaker(engine, expire_on_commit=False), FrameStore(settings.resolved_frames_dir))
        old = insert(store, "OLD", b"an old PASS frame")
    finally:
        engine.dispose()
    with TestClient(create_app(settings), headers=AUTH) as client:
        assert client.app.state.services.retention is None  # type: ignore[attr-defined]
        assert client.get(f"/inspections/{old}/frame").content == b"an old PASS frame"
    assert frame_path(store, b"an old PASS frame").is_file()


# -- what the pass deletes and keeps ----------------------------------------------------------------


def test_old_unremarkable_pass_frames_go_and_every_other_frame_stays(store: Store) -> None:
    rate = 0.5  # half the PASS modules are sampled into the review queue: those stay
    frames = {name: f"frame of {name}".encode() for name in ("FAIL", "REVIEW", "REVIEWED", "NEW")}
    # in this order the fresh tables' ids 1 and 3 fall outside the sample: only the review and the
    # age keep these two
    reviewed = insert(store, "REVIEWED", frames["REVIEWED"])
    review(store.sessions, reviewed)
    fail = insert(store, "FAIL", frames["FAIL"], "FAIL")
    recent = insert(store, "NEW", frames["NEW"], age_days=NEW)
    flagged = insert(store, "REVIEW", frames["REVIEW"], "REVIEW")
    assert not sampled(reviewed, rate) and not sampled(recent, rate)
    passes = {}
    for n in range(6):
        data = f"old PASS frame {n}".encode()
        passes[insert(store, f"P{n}", data)] = data
    sampled_ids = {i for i in passes if sampled(i, rate)}
    assert 0 < len(sampled_ids) < len(passes)  # both kinds are there
    unsampled = {i: data for i, data in passes.items() if i not in sampled_ids}
    observed: list[tuple[int, int]] = []

    result = prune(store, rate, observe=lambda n, size: observed.append((n, size)))

    freed = sum(len(data) for data in unsampled.values())
    assert (result.frames, result.rows, result.bytes) == (len(unsampled), len(unsampled), freed)
    assert sum(n for n, _ in observed) == len(unsampled) and sum(s for _, s in observed) == freed
    for inspection_id, data in passes.items():
        gone = inspection_id not in sampled_ids
        assert frame_path(store, data).exists() is not gone, inspection_id
        assert (pruned_at(store.sessions, inspection_id) is not None) is gone, inspection_id
    for inspection_id, name in ((fail, "FAIL"), (flagged, "REVIEW"), (reviewed, "REVIEWED"), (recent, "NEW")):
        assert frame_path(store, frames[name]).is_file(), name
        assert pruned_at(store.sessions, inspection_id) is None, name
    with store.sessions() as session:  # the verdict stays as it was answered
        assert session.scalar(select(Inspection.verdict).where(Inspection.id == min(unsampled))) == "PASS"
    assert prune(store, rate) == PruneResult()  # nothing left to do


def test_bytes_shared_with_a_kept_row_stay_until_every_row_may_let_them_go(store: Store) -> None:
    shared = b"identical bytes, posted for two modules"
    old = insert(store, "OLD", shared)
    recent = insert(store, "NEW", shared, age_days=NEW)
    flagged_bytes = b"identical bytes of a failed and a passed module"
    old_pass = insert(store, "OLD-PASS", flagged_bytes)
    insert(store, "OLD-FAIL", flagged_bytes, "FAIL")

    result = prune(store)

    assert result.frames == 0 and result.rows == 0 and result.kept_shared == 2
    assert frame_path(store, shared).is_file() and frame_path(store, flagged_bytes).is_file()
    assert pruned_at(store.sessions, old) is None and pruned_at(store.sessions, old_pass) is None
    # once the newer row is old too, both rows let the bytes go together; the FAIL row never does
    later = prune(store, now=utcnow() + timedelta(days=DAYS))
    assert later.frames == 1 and later.rows == 2 and later.kept_shared == 1
    assert not frame_path(store, shared).exists() and frame_path(store, flagged_bytes).is_file()
    assert pruned_at(store.sessions, old) is not None and pruned_at(store.sessions, recent) is not None


def test_replicas_on_postgresql_take_turns_at_a_pass(store: Store, database_url: str) -> None:
    data = b"an old PASS frame"
    insert(store, "OLD", data)
    if not database_url.startswith("postgresql"):  # SQLite: one process, one pruner: always runs
        assert prune(store).frames == 1
        return
    engine = store.sessions.kw["bind"]
    key = {"space": PASS_LOCK_SPACE, "key": 0}
    with engine.connect() as other_replica:  # runs a pass right now
        assert other_replica.scalar(text("SELECT pg_try_advisory_lock(:space, :key)"), key)
        # skipped: the other replica's pass does the work
        assert prune(store) == PruneResult(skipped=True)
        assert frame_path(store, data).is_file()
        other_replica.execute(text("SELECT pg_advisory_unlock(:space, :key)"), key)
    assert prune(store).frames == 1
    with engine.connect() as connection:  # and the pass gave its lock back
        assert connection.scalar(text("SELECT pg_try_advisory_lock(:space, :key)"), key)
        connection.execute(text("SELECT pg_advisory_unlock(:space, :key)"), key)


# -- races with an insert of identical bytes --------------------------------------------------------


def test_a_frame_pruned_after_staging_found_it_is_written_again_before_the_commit(store: Store) -> None:
    data = b"the same module frame, posted again under a new serial"
    old = insert(store, "OLD", data)
    staged = store.frames.stage(data, sha256_hex(data), "png")
    assert staged.temporary is None  # found already stored: nothing new was written

    assert prune(store).frames == 1  # the pass deletes it between the staging and the insert
    assert not frame_path(store, data).exists() and pruned_at(store.sessions, old) is not None

    row, created = insert_inspection(store.sessions, new_row("NEW", data, age_days=0), staged)
    assert created and row.frame_pruned_at is None
    assert frame_path(store, data).read_bytes() == data  # the committed row's file is there
    assert prune(store).frames == 0  # and the next pass keeps it for the new row
    assert frame_path(store, data).read_bytes() == data


def test_a_pass_during_an_insert_waits_for_its_commit_and_keeps_the_file(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"bytes stored for an old module and posted again now"
    old = insert(store, "OLD", data)
    outcome: dict[str, Any] = {}
    publish = StagedFrame.publish

    def run_pass() -> None:
        try:
            outcome["result"] = prune(store)
        except BaseException as exc:  # the assertion below names it
            outcome["result"] = exc

    def pass_then_publish(frame: StagedFrame) -> Path:
        # the insert has flushed its row and holds the frame lock: a pass now must wait for its commit
        runner = threading.Thread(target=run_pass)
        runner.start()
        runner.join(timeout=1.0)
        outcome["pass waited"] = runner.is_alive()
        outcome["runner"] = runner
        return publish(frame)

    monkeypatch.setattr(StagedFrame, "publish", pass_then_publish)
    _, created = insert_inspection(
        store.sessions, new_row("NEW", data, age_days=0), store.frames.stage(data, sha256_hex(data), "png")
    )
    monkeypatch.undo()
    outcome["runner"].join(timeout=60)

    assert created and outcome["pass waited"], "the pass did not wait for the insert's frame lock"
    assert outcome["result"] == PruneResult(kept_shared=1), outcome["result"]
    assert frame_path(store, data).read_bytes() == data
    assert pruned_at(store.sessions, old) is None  # kept: a row that needs the same bytes came in


# -- readers of a pruned frame ----------------------------------------------------------------------


def post_pass(client: TestClient, serial: str, level: int = BRIGHT) -> int:
    """A PASS module of cells at `level` (frames of other levels are other bytes)."""
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    body = png(module_frame(np.full((6, 10), level)))
    response = client.post("/lines/L1/modules", content=body, headers=headers)
    assert response.status_code == 201 and response.json()["verdict"] == "PASS", response.text
    return int(response.json()["inspection_id"])


def age(sessions: sessionmaker[Session], inspection_id: int, days: float = OLD) -> None:
    with sessions() as session:
        session.execute(
            update(Inspection)
            .where(Inspection.id == inspection_id)
            .values(created_at=utcnow() - timedelta(days=days))
        )
        session.commit()


def test_a_pruned_frame_is_410_gone_and_its_verdict_stays(
    make_settings: MakeSettings, database_url: str
) -> None:
    settings = make_settings(database_url=database_url, review_pass_sample_rate=0.0)
    with TestClient(create_app(settings), headers=AUTH) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        inspection = post_pass(client, "P1")
        assert client.get(f"/inspections/{inspection}/preview", params={"width": 200}).status_code == 200
        assert list(services.previews.root.glob("*.jpg"))  # a cached preview of the frame
        age(services.sessions, inspection)

        result = prune_frames(services.sessions, services.frames, DAYS, 0.0, previews=services.previews.root)

        assert result.frames == 1 and list(services.previews.root.glob("*.jpg")) == []
        # a preview a request made while the pass deleted the frame: the frame decides, not the cache
        digest = client.get(f"/inspections/{inspection}").json()["frame_sha256"]
        (services.previews.root / f"{digest}-360.jpg").write_bytes(b"made while the frame was deleted")
        for path in (
            f"/inspections/{inspection}/frame",
            f"/inspections/{inspection}/preview?width=200",
            f"/review/inspections/{inspection}/cells/0/0/heatmap",
        ):
            gone = client.get(path)
            assert gone.status_code == 410, (path, gone.text)
            assert "removed by the frame retention policy" in gone.json()["error"], path
        stored = client.get(f"/inspections/{inspection}").json()
        assert stored["verdict"] == "PASS" and len(stored["cells"]) == 60 and stored["frame_pruned_at"]
        listed = client.get("/inspections").json()["items"]
        assert [i["frame_pruned_at"] is not None for i in listed] == [True]
        reviewed = client.get(f"/review/inspections/{inspection}").json()
        assert reviewed["inspection"]["frame_pruned_at"] == stored["frame_pruned_at"]


def test_a_frame_missing_for_another_reason_is_410_without_blaming_the_policy(
    sqlite_client: TestClient,
) -> None:
    services = sqlite_client.app.state.services  # type: ignore[attr-defined]
    inspection = post_pass(sqlite_client, "P1")
    for path in services.frames.root.rglob("*.png"):
        path.unlink()
    gone = sqlite_client.get(f"/inspections/{inspection}/frame")
    assert gone.status_code == 410 and "is no longer stored" in gone.json()["error"]
    assert "retention" not in gone.json()["error"]


def test_the_export_counts_pruned_frames_and_does_not_fail(
    make_settings: MakeSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(review_pass_sample_rate=0.0)
    with TestClient(create_app(settings), headers=AUTH) as client:
        services = client.app.state.services  # type: ignore[attr-defined]
        pruned = post_pass(client, "PRUNED")
        kept = post_pass(client, "KEPT", level=BRIGHT - 20)  # recent: its frame stays
        age(services.sessions, pruned)
        assert prune_frames(services.sessions, services.frames, DAYS, 0.0).frames == 1
        # both reviewed, one after its frame went (a PASS opened from its id, or a sample rate raised later)
        for inspection in (pruned, kept):
            decided = client.post(f"/review/inspections/{inspection}/decisions", json={"module": "PASS"})
            assert decided.status_code == 201, decided.text

        summary = export_reviewed(services.sessions, services.frames, tmp_path / "out", cell_size=32)

    # the kept module's 60 cells are exported; the pruned one is counted, not a failure
    assert (summary.pruned_frames, summary.skipped_frames, summary.cells, summary.modules) == (1, 0, 60, 2)
    code = pvqc_main(
        [
            "export-reviewed",
            "--out",
            str(tmp_path / "cli"),
            "--cell-size",
            "32",
            "--var-dir",
            str(settings.var_dir),
        ]
    )
    assert code == 0 and '"pruned_frames": 1' in capsys.readouterr().out


# -- the background task ----------------------------------------------------------------------------


def test_with_a_retention_set_the_service_prunes_at_start_and_counts_it(
    make_settings: MakeSettings, database_url: str
) -> None:
    settings = make_settings(
        database_url=database_url, review_pass_sample_rate=0.0, frame_retention_days=DAYS
    )
    engine = make_engine(settings.resolved_database_url)
    try:
        upgrade_head(engine)
        store = Store(sessionmaker(engine, expire_on_commit=False), FrameStore(settings.resolved_frames_dir))
        old = insert(store, "OLD", b"an old PASS frame")
        recent = insert(store, "NEW", b"a recent PASS frame", age_days=NEW)
    finally:
        engine.dispose()
    with TestClient(create_app(settings), headers=AUTH) as client:
        pruner = client.app.state.services.retention  # type: ignore[attr-defined]
        assert pruner is not None
        deadline = time.monotonic() + 30  # the first pass runs at start, in the background
        while not pruner.passes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pruner.passes >= 1 and pruner.last.frames == 1
        assert client.get(f"/inspections/{old}/frame").status_code == 410
        assert client.get(f"/inspections/{recent}/frame").content == b"a recent PASS frame"
        metrics = client.get("/metrics").text
        assert "pvqc_frames_pruned_total 1.0" in metrics
        assert f"pvqc_frames_pruned_bytes_total {float(len(b'an old PASS frame'))}" in metrics
    assert not frame_path(store, b"an old PASS frame").exists()


def test_a_decision_committed_while_the_pass_waits_keeps_the_frame(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # on PostgreSQL a reviewer's decision locks the inspection row, the pass's UPDATE waits on it and,
    # once the decision commits, re-checks only the row itself: the row is marked all the same. The
    # check under the frame lock must read the decision. Here it is committed exactly then.
    if store.sessions.kw["bind"].dialect.name == "sqlite":
        pytest.skip("the pass holds SQLite's write lock by then: a decision waits for the pass instead")
    data = png(BRIGHT)
    inspection_id = insert(store, "M1", data)
    import serving.retention as retention

    real_lock = retention.lock_frame

    def decide_then_lock(session: Session, digest: str) -> None:
        review(store.sessions, inspection_id)
        real_lock(session, digest)

    monkeypatch.setattr(retention, "lock_frame", decide_then_lock)
    result = prune(store)
    assert result.frames == 0 and pruned_at(store.sessions, inspection_id) is None
    assert frame_path(store, data).is_file()


def test_the_pass_and_the_insert_read_committed_whatever_the_servers_default(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # under REPEATABLE READ the pass's snapshot predates its wait for the frame lock and misses an
    # insert that committed meanwhile, then deletes that row's file
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time: no snapshot can miss a committed insert")
    monkeypatch.setenv("PGOPTIONS", "-c default_transaction_isolation=repeatable\\ read")
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(text("SHOW transaction_isolation")) == "read committed"
    finally:
        engine.dispose()


def test_a_sampled_pass_whose_frame_was_pruned_leaves_the_review_queue(store: Store) -> None:
    # pruned while the sample rate was lower, then sampled at a higher one: nothing left to review
    from serving.review import in_queue

    rate = 0.5
    data = [png(BRIGHT + k) for k in range(12)]
    ids = [insert(store, f"M{k}", frame) for k, frame in enumerate(data)]
    chosen = [i for i in ids if sampled(i, rate)]
    assert chosen, "expected some of 12 rows in a 50 % sample"
    prune(store, rate=0.0)
    with store.sessions() as session:
        queued = session.scalars(select(Inspection.id).where(in_queue(rate))).all()
    assert queued == []


# -- pvqc prune-frames ------------------------------------------------------------------------------


def prune_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    """Exit status and the one JSON line of `pvqc prune-frames` on stdout."""
    code = pvqc_main(["prune-frames", *args])
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1, out
    return code, json.loads(out)


def prune_cli_error(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Exit status and stderr of a `pvqc prune-frames` that fails: one line, no traceback, no output."""
    code = pvqc_main(["prune-frames", *args])
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and err.count("\n") == 1 and err.endswith("\n") and "Traceback" not in err, err
    assert err.startswith("pvqc prune-frames: "), err
    return code, err


def store_state(sessions: sessionmaker[Session], root: Path) -> tuple[list[Any], list[tuple[str, int]]]:
    """Every row's frame_pruned_at and every file under `root` with its size."""
    with sessions() as session:
        rows = list(
            session.execute(select(Inspection.id, Inspection.frame_pruned_at).order_by(Inspection.id))
        )
    files = sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*") if p.is_file())
    return rows, files


def test_prune_frames_dry_run_counts_what_its_pass_then_deletes_as_the_service_would(
    make_settings: MakeSettings,
    database_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rate = 0.5  # the service's sample rate: the command must take it from the settings, as the service
    monkeypatch.setenv("PVQC_FRAME_RETENTION_DAYS", str(DAYS))
    monkeypatch.setenv("PVQC_REVIEW_PASS_SAMPLE_RATE", str(rate))
    settings = make_settings(database_url=database_url, review_pass_sample_rate=rate)
    where = ["--var-dir", str(settings.var_dir), "--database-url", database_url]
    engine = make_engine(database_url)
    try:
        upgrade_head(engine)
        store = Store(sessionmaker(engine, expire_on_commit=False), FrameStore(settings.resolved_frames_dir))
        data = {name: f"frame of {name}".encode() for name in ("GO", "SAMPLED", "TWIN", "FAIL", "NEW")}
        data |= {"REVIEW": b"a flagged frame", "REVIEWED": b"a reviewed frame", "SHARED": b"shared bytes"}
        # ids of fresh tables, in this order: of the PASS rows 2, 6 and 9 fall in the 50 % sample
        ids = {
            "GO": insert(store, "GO", data["GO"]),
            "SAMPLED": insert(store, "SAMPLED", data["SAMPLED"]),
            "TWIN-1": insert(store, "TWIN-1", data["TWIN"]),
            "FAIL": insert(store, "FAIL", data["FAIL"], "FAIL"),
            "TWIN-2": insert(store, "TWIN-2", data["TWIN"]),  # the same bytes: one file, two rows
            "NEW": insert(store, "NEW", data["NEW"], age_days=NEW),
            "REVIEW": insert(store, "REVIEW", data["REVIEW"], "REVIEW"),
            "REVIEWED": insert(store, "REVIEWED", data["REVIEWED"]),
            "SHARED-NEW": insert(store, "SHARED-NEW", data["SHARED"], age_days=NEW),
            "SHARED-OLD": insert(store, "SHARED-OLD", data["SHARED"]),  # kept for the recent row
        }
        review(store.sessions, ids["REVIEWED"])
        passes = {name: i for name, i in ids.items() if name not in ("FAIL", "REVIEW")}
        assert {name for name, i in passes.items() if sampled(i, rate)} == {"SAMPLED", "NEW", "SHARED-NEW"}
        previews = settings.resolved_frames_dir / "previews"
        previews.mkdir()
        for name in ("GO", "SAMPLED"):
            (previews / f"{sha256_hex(data[name])}-360.jpg").write_bytes(b"a cached preview")
        before = store_state(store.sessions, settings.var_dir)

        code, dry = prune_cli(capsys, "--dry-run", *where)

        assert code == 0 and dry["dry_run"] is True and (dry["days"], dry["sample_rate"]) == (DAYS, rate)
        gone = ("GO", "TWIN-1", "TWIN-2")
        freed = len(data["GO"]) + len(data["TWIN"])
        counts = {key: dry[key] for key in ("inspections", "frames", "bytes", "kept_shared", "failed")}
        assert counts == {"inspections": 3, "frames": 2, "bytes": freed, "kept_shared": 1, "failed": 0}
        assert store_state(store.sessions, settings.var_dir) == before  # nothing changed
        # --days wins over PVQC_FRAME_RETENTION_DAYS: no row is 100 days old
        code, older = prune_cli(capsys, "--dry-run", "--days", "100", *where)
        assert code == 0 and (older["days"], older["inspections"], older["frames"]) == (100, 0, 0)

        code, done = prune_cli(capsys, *where)  # the real pass, with the settings' days

        assert code == 0 and done["dry_run"] is False and not done["skipped"] and not done["stopped"]
        assert {key: done[key] for key in counts} == counts  # what the dry run said, exactly
        for name, inspection_id in ids.items():
            assert (pruned_at(store.sessions, inspection_id) is not None) is (name in gone), name
        for name, frame in data.items():
            assert frame_path(store, frame).exists() is (name not in ("GO", "TWIN")), name
        assert [p.name for p in previews.iterdir()] == [f"{sha256_hex(data['SAMPLED'])}-360.jpg"]
        code, again = prune_cli(capsys, "--dry-run", *where)
        assert code == 0 and (again["inspections"], again["frames"], again["kept_shared"]) == (0, 0, 1)
        after = store_state(store.sessions, settings.var_dir)
    finally:
        engine.dispose()
    # the service with the same settings finds nothing more to delete: the command did its pass
    with TestClient(
        create_app(settings.model_copy(update={"frame_retention_days": DAYS})), headers=AUTH
    ) as client:
        pruner = client.app.state.services.retention  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while not pruner.passes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pruner.last == PruneResult(kept_shared=1)
        assert store_state(client.app.state.services.sessions, settings.var_dir) == after  # type: ignore[attr-defined]


def test_a_dry_run_only_reads_beside_a_writer_and_another_replicas_pass(
    store: Store, database_url: str
) -> None:
    data = b"an old PASS frame"
    inspection_id = insert(store, "OLD", data)
    outcome: dict[str, Any] = {}
    runner = threading.Thread(
        target=lambda: outcome.update(result=would_prune(store.sessions, store.frames, DAYS, 0.0))
    )
    if database_url.startswith("sqlite"):
        # a writer holds SQLite's write lock: the pass would wait for it, the dry run reads on
        writer = sqlite3.connect(database_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            writer.execute("UPDATE inspections SET serial = serial")
            runner.start()
            runner.join(timeout=20)
        finally:
            writer.rollback()
            writer.close()
    else:
        # another replica's pass holds the pass lock and has marked the row (uncommitted, row locked)
        with store.sessions.kw["bind"].connect() as other:
            key = {"space": PASS_LOCK_SPACE, "key": 0}
            assert other.scalar(text("SELECT pg_try_advisory_lock(:space, :key)"), key)
            other.execute(text("UPDATE inspections SET serial = serial"))
            runner.start()
            runner.join(timeout=20)
            other.rollback()
            other.execute(text("SELECT pg_advisory_unlock(:space, :key)"), key)
            other.commit()
    assert not runner.is_alive(), "the dry run waited for a lock"
    assert outcome["result"] == PruneResult(frames=1, bytes=len(data), rows=1)
    assert frame_path(store, data).is_file() and pruned_at(store.sessions, inspection_id) is None


def test_prune_frames_refuses_bad_or_missing_days_and_unreadable_stores_in_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PVQC_FRAME_RETENTION_DAYS", raising=False)
    var = tmp_path / "var"
    for days in ("0", "-3", "a month", "1.5", "1000000"):  # a million days would run past year 1
        code, err = prune_cli_error(capsys, "--days", days, "--dry-run", "--var-dir", str(var))
        assert (
            code == 2
            and "--days: expected a whole number of days from 1 to 36500" in err
            and repr(days) in err
        )
    code, err = prune_cli_error(capsys, "--dry-run", "--var-dir", str(var))
    assert code == 2 and "expected --days N or PVQC_FRAME_RETENTION_DAYS" in err
    monkeypatch.setenv("PVQC_FRAME_RETENTION_DAYS", "0")
    code, err = prune_cli_error(capsys, "--dry-run", "--var-dir", str(var))
    assert code == 2 and "frame_retention_days" in err and "from 1 to 36500" in err
    monkeypatch.setenv("PVQC_FRAME_RETENTION_DAYS", str(DAYS))
    code, err = prune_cli_error(capsys, "--var-dir", str(var))
    assert code == 2 and f"no database at {var / 'pvqc.db'}" in err
    assert list(tmp_path.iterdir()) == []  # no stray pvqc.db or frames/
    (var / "frames").mkdir(parents=True)
    (var / "pvqc.db").write_bytes(b"")  # a file, but not a pvqc service's database
    for args in ((), ("--dry-run",)):
        code, err = prune_cli_error(capsys, *args, "--var-dir", str(var))
        assert code == 2 and "the database has no pvqc schema" in err and "start the service once" in err
    code, err = prune_cli_error(
        capsys, "--var-dir", str(var), "--database-url", "postgresql+psycopg://127.0.0.1:1/x"
    )
    assert code == 2 and "cannot read the service's database at postgresql+psycopg://127.0.0.1:1/x" in err


def test_prune_frames_says_when_another_replicas_pass_ran_instead(
    store: Store, database_url: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite: one process, one pruner: a pass always runs")
    data = b"an old PASS frame"
    insert(store, "OLD", data)
    where = ["--days", str(DAYS), "--var-dir", str(tmp_path), "--database-url", database_url]
    assert store.frames.root == tmp_path / "frames"
    with store.sessions.kw["bind"].connect() as other_replica:
        key = {"space": PASS_LOCK_SPACE, "key": 0}
        assert other_replica.scalar(text("SELECT pg_try_advisory_lock(:space, :key)"), key)
        code, skipped = prune_cli(capsys, *where)
        other_replica.execute(text("SELECT pg_advisory_unlock(:space, :key)"), key)
        other_replica.commit()
    assert code == 1 and skipped["skipped"] is True and skipped["frames"] == 0
    assert frame_path(store, data).is_file()
    code, done = prune_cli(capsys, *where)
    assert code == 0 and done["skipped"] is False and done["frames"] == 1


def test_prune_frames_refuses_a_database_the_service_has_not_migrated_yet(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # a pvqc database one revision behind lacks frame_pruned_at: say so, and change nothing
    var = tmp_path / "var"
    (var / "frames").mkdir(parents=True)
    url = f"sqlite:///{var / 'pvqc.db'}"
    engine = make_engine(url)
    try:
        upgrade_head(engine)
    finally:
        engine.dispose()
    downgrade(url, "0004")
    for args in ((), ("--dry-run",)):
        code, err = prune_cli_error(capsys, *args, "--days", str(DAYS), "--var-dir", str(var))
        assert code == 2 and "schema revision 0004, this pvqc needs 0005" in err


def test_a_dry_run_counts_bytes_posted_again_after_their_first_rows_were_pruned(store: Store) -> None:
    # the first row is pruned and its file gone; the same bytes posted again for an old PASS bring the
    # file back, and the pass deletes it again: the already-pruned row must not count as keeping it
    data = b"the same bytes, posted twice"
    first = insert(store, "FIRST", data)
    assert prune(store).frames == 1 and not frame_path(store, data).exists()
    again = insert(store, "AGAIN", data)
    assert frame_path(store, data).is_file()
    dry = would_prune(store.sessions, store.frames, DAYS, 0.0)
    assert (dry.frames, dry.rows, dry.kept_shared) == (1, 1, 0)
    result = prune(store)
    assert (result.frames, result.rows, result.kept_shared) == (dry.frames, dry.rows, dry.kept_shared)
    assert pruned_at(store.sessions, first) is not None and pruned_at(store.sessions, again) is not None
