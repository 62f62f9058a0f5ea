"""`pvqc serve`: run the inspection service under uvicorn; `pvqc prune-frames`: frame retention by hand.

Owns: the command-line flags (each overrides the matching `PVQC_` setting) and the uvicorn start.
One process serves everything; scale out with replicas, not uvicorn workers, because each worker
would load its own model and fight the others for the same cores.

`pvqc prune-frames` runs, now, the retention pass the service runs hourly (serving/retention.py), with
the service's settings (sample rate, frame folder, preview folder), or with `--dry-run` counts what
that pass would delete, changing nothing. Its output is one JSON line on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import NoReturn

log = logging.getLogger(__name__)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pvqc serve", description="run the pvqc inspection service")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-dir", type=Path, help="folder with card.json and the ONNX files")
    parser.add_argument("--variant", help="model file variant from the card, e.g. fp32 or int8")
    parser.add_argument(
        "--registry",
        type=Path,
        help="model registry folder (e.g. models/pvqc-cell): serve and follow its active version",
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL; default: SQLite under ./var/")
    parser.add_argument("--var-dir", type=Path, help="folder for the embedded database and frames")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser.parse_args(argv)


def serve_cli(argv: list[str]) -> int:
    import uvicorn

    from serving.app import create_app
    from serving.settings import Settings

    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides = {
        "model_dir": args.model_dir,
        "model_variant": args.variant,
        "model_registry": args.registry,
        "database_url": args.database_url,
        "var_dir": args.var_dir,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    model = f"the registry {settings.model_registry}" if settings.model_registry else settings.model_dir
    log.info("pvqc serve on http://%s:%d with model %s", args.host, args.port, model)
    uvicorn.run(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=False,
        # open event streams (screens) never end by themselves: close them after 5 s on shutdown
        timeout_graceful_shutdown=5,
    )
    return 0


class UsageError(Exception):
    """A bad command line, said in one line (argparse's own error prints the usage and exits)."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def retention_days_arg(text: str) -> int:
    from serving.settings import MAX_RETENTION_DAYS

    try:
        days = int(text)
    except ValueError:
        days = 0
    if not 1 <= days <= MAX_RETENTION_DAYS:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of days from 1 to {MAX_RETENTION_DAYS} (how long a PASS module's "
            f"frame is kept), got {text!r}"
        )
    return days


def prune_frames_cli(argv: list[str]) -> int:
    """Exit status: 0 the pass ran to its end (or the dry run counted); 1 it did not finish: another
    replica was running a pass (PostgreSQL), a signal stopped it, or some files could not be deleted
    (kept until the next pass); 2 nothing done (bad input, a store that cannot be read)."""
    from pydantic import ValidationError
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.orm import sessionmaker

    from serving.db import make_engine, schema_behind, utcnow
    from serving.export_reviewed import check_store, unreadable_database
    from serving.retention import prune_frames, retention_cutoff, would_prune
    from serving.settings import Settings
    from serving.store import FrameStore

    parser = OneLineParser(
        prog="pvqc prune-frames",
        description="run the frame retention pass now, or count what it would delete (--dry-run)",
    )
    parser.add_argument(
        "--days",
        type=retention_days_arg,
        metavar="N",
        help="delete frames of PASS modules older than this; default: PVQC_FRAME_RETENTION_DAYS",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="count what a pass would delete now; change nothing"
    )
    parser.add_argument("--database-url", help="SQLAlchemy URL; default: the service's (PVQC_ settings)")
    parser.add_argument("--var-dir", type=Path, help="the service's var folder (database and frames)")
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return prune_failed(f"{exc} (see pvqc prune-frames --help)")
    overrides = {"database_url": args.database_url, "var_dir": args.var_dir}
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
        )
        return prune_failed(f"invalid PVQC_ settings: {problems}")
    days = args.days if args.days is not None else settings.frame_retention_days
    if days is None:
        return prune_failed(
            "no retention given: expected --days N or PVQC_FRAME_RETENTION_DAYS, a whole number of "
            "days >= 1 (how long a PASS module's frame is kept)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    database_url = settings.resolved_database_url
    problem = check_store(database_url, settings.resolved_frames_dir)
    if problem is not None:
        return prune_failed(problem)
    shown = make_url(database_url).render_as_string(hide_password=True)
    sample_rate = settings.review_pass_sample_rate
    now = utcnow()
    stop = threading.Event()
    try:
        engine = make_engine(database_url)
        try:
            behind = schema_behind(engine)
            if behind is not None:
                return prune_failed(f"{behind} ({shown})")
            sessions = sessionmaker(engine, expire_on_commit=False)
            frames = FrameStore(settings.resolved_frames_dir)
            with stopping_on_signals(stop):
                if args.dry_run:
                    result = would_prune(sessions, frames, days, sample_rate, now=now, stop=stop)
                else:
                    # as the service's pruner does (serving/app.py start_retention)
                    previews = settings.resolved_frames_dir / "previews"
                    result = prune_frames(
                        sessions, frames, days, sample_rate, now=now, previews=previews, stop=stop
                    )
        finally:
            engine.dispose()
    except SQLAlchemyError as exc:
        return prune_failed(unreadable_database(shown, exc))
    except OSError as exc:  # the pass itself counts a file it cannot delete and goes on
        return prune_failed(f"cannot read the frame folder {settings.resolved_frames_dir}: {exc}")
    output = {
        "dry_run": args.dry_run,
        "days": days,
        "before": retention_cutoff(now, days).isoformat(timespec="seconds"),
        "sample_rate": sample_rate,
        "inspections": result.rows,
        "frames": result.frames,
        "bytes": result.bytes,
        "kept_shared": result.kept_shared,
        "failed": result.failed,
        "skipped": result.skipped,
        "stopped": stop.is_set(),
    }
    sys.stdout.write(json.dumps(output) + "\n")  # the command's output, one JSON line
    return 1 if result.failed or result.skipped or stop.is_set() else 0


def prune_failed(message: str) -> int:
    sys.stderr.write(f"pvqc prune-frames: {message}\n")  # one line, no traceback: the command's output
    return 2


@contextlib.contextmanager
def stopping_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop`: the pass ends after the digest in hand, as at the service's
    shutdown, rather than between deleting a file and marking its rows. Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum: int, _frame: FrameType | None) -> None:
        log.warning("%s: stopping after the frame in hand", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            # None: a handler installed outside Python, which cannot be put back from here
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def wait_until_ready(process: subprocess.Popen[bytes], base: str, timeout: float) -> None:
    """Block until a `pvqc serve` subprocess answers /v2/health/ready; raise if it dies or stays silent.

    For benchmarks and tests that start the service as a separate process.
    """
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"service exited with {process.returncode}")
        try:
            if httpx.get(f"{base}/v2/health/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"service did not become ready in {timeout:.0f} s")
