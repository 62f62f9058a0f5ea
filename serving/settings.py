"""The service's one settings object (pydantic-settings, env prefix `PVQC_`).

Owns: every knob of the service and its defaults. Each default serves the embedded single-machine
mode (SQLite file and frame files under `./var/`, the shipped model under `models/`); the cluster
mode is chosen by overriding values (e.g. `PVQC_DATABASE_URL=postgresql+psycopg://...`), never by
code forks. Nested values come from JSON env values, e.g.
`PVQC_LINES='{"L1": {"rows": 6, "cols": 10}}'`. Also the shift windows: shift start times are wall-clock
times in `timezone`, turned into instants date by date with that zone's daylight-saving rules.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta, tzinfo
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.card import SHIPPED_MODEL_DIR

DEFAULT_MODEL_DIR = SHIPPED_MODEL_DIR


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container's cpuset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


MIN_GRID = 2  # rows and columns of a module: with one, that axis has no gap to check the grid by


MAX_RETENTION_DAYS = 36_500  # a century: beyond it a date before year 1 is only a crash away


class LineConfig(BaseModel):
    """One production line: its module grid and what the shop-floor screen needs to judge it."""

    # at least 2 each: the geometry checks a module's grid against the gaps it sees between cells
    rows: int = Field(default=6, ge=MIN_GRID, le=64)
    cols: int = Field(default=10, ge=MIN_GRID, le=64)
    pass_rate_floor: float = Field(default=0.95, ge=0.0, le=1.0, description="alarm below this pass rate")
    takt_seconds: float = Field(default=30.0, gt=0.0, description="expected seconds between modules")
    shift_starts: list[time] = Field(
        default_factory=lambda: [time(6, 0), time(14, 0), time(22, 0)],
        description="shift start times in the service's `timezone`; the current shift is the latest "
        "one that has begun",
    )
    name: str = ""

    @field_validator("shift_starts")
    @classmethod
    def _some_shift_starts(cls, starts: list[time]) -> list[time]:
        if not starts:  # with none, no shift is ever current: the shift window would have no start
            raise ValueError('expected at least one shift start time per line, e.g. ["06:00"]')
        return starts


def _default_lines() -> dict[str, LineConfig]:
    # a 60-cell and a 144-cell (half-cut) line, the two layouts factories mostly run
    return {"line-1": LineConfig(rows=6, cols=10, name="60-cell line"), "line-2": LineConfig(rows=6, cols=24)}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PVQC_", env_nested_delimiter="__", extra="ignore")

    # model
    model_dir: Path = DEFAULT_MODEL_DIR
    model_variant: str = Field(default="fp32", description="which file of the card's `files` to serve")
    ort_threads: int = Field(
        default=0, ge=0, description="onnxruntime intra-op threads per call; 0 = cores / inference_workers"
    )
    inference_workers: int = Field(
        default=0,
        ge=0,
        description="batcher threads running onnxruntime calls side by side; 0 = one per core",
    )
    model_registry: Path | None = Field(
        default=None,
        description="a registry folder (e.g. models/pvqc-cell): serve its active version and follow "
        "promotions and rollbacks without a restart; unset: serve model_dir as it is",
    )
    registry_poll_seconds: float = Field(default=2.0, gt=0.0, description="how often registry.json is read")

    # store
    var_dir: Path = Path("var")
    database_url: str = ""  # empty: sqlite file under var_dir
    # PostgreSQL connections one replica may hold: kept, and opened beyond those under a burst. Replicas
    # (the autoscaler's maximum) x their sum must stay below the server's max_connections (100 by default)
    db_pool_size: int = Field(default=10, ge=1)
    db_max_overflow: int = Field(default=10, ge=0)
    frames_dir: Path | None = None  # None: var_dir / "frames"

    # lines
    lines: dict[str, LineConfig] = Field(default_factory=_default_lines)
    timezone: str = Field(
        default="",
        description="IANA name of the factory's time zone (e.g. Europe/Berlin), in which shift start "
        "times are read; empty: the machine's (TZ, else /etc/localtime; a container's is UTC)",
    )

    # input limits
    max_body_bytes: int = Field(default=64 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=60_000_000, gt=0, description="decompression-bomb guard (w x h)")
    max_grid_cells: int = Field(default=400, gt=0, description="rows x cols above this is rejected")
    frame_workers: int = Field(
        default=0,
        ge=0,
        description="frames decoded and cut side by side; more wait their turn. A large 16-bit frame "
        "takes hundreds of MB while it is converted, so this bounds memory; 0 = one per core",
    )
    max_v2_batch: int = Field(default=256, gt=0)

    # micro-batcher
    max_batch: int = Field(default=16, ge=1, description="cells per onnxruntime call")
    max_wait_ms: float = Field(default=5.0, ge=0.0, description="how long a batch waits to fill")
    # counted in model inputs: a half cell is two (model.preprocess.half_cell_views), so three 144-cell
    # half-cut modules in flight are 864 of them
    max_queue_cells: int = Field(
        default=1000, ge=1, description="model inputs waiting beyond this -> 503 (about 90 kB each at 300 px)"
    )
    retry_after_seconds: int = Field(default=2, ge=1)
    shutdown_grace_seconds: float = Field(
        default=10.0, ge=0.0, description="how long shutdown waits for background work (shadow scoring)"
    )

    # statistics
    stats_default_last: int = Field(default=100, ge=1)

    # access: API keys with roles (serving/auth.py)
    bootstrap_admin_key: SecretStr | None = Field(
        default=None,
        description="the admin key to create when no key exists; unset: a random one is made and logged once",
    )
    auth_cache_seconds: float = Field(default=5.0, ge=0.0, description="how long a checked key is trusted")
    cookie_secure: bool = Field(default=False, description="mark the sign-in cookie Secure (behind HTTPS)")

    # live events (serving/live.py)
    broker_url: str = Field(
        default="", description="redis://... to share events between replicas; empty: in-process"
    )
    broker_prefix: str = Field(default="pvqc", description="Redis channel and key prefix")
    sse_keepalive_seconds: float = Field(default=15.0, gt=0.0)
    sse_max_clients: int = Field(default=200, ge=1, description="connected streams beyond this get 503")
    sse_client_queue: int = Field(
        default=256, ge=1, description="events a slow stream may lag before a resync"
    )
    sse_replay_events: int = Field(default=1000, ge=1, description="events kept for Last-Event-ID resumes")
    events_min_interval_seconds: float = Field(
        default=0.2, ge=0.0, description="a line's snapshot is recomputed at most this often"
    )
    alarm_check_seconds: float = Field(default=5.0, gt=0.0, description="period of the takt and window check")
    trend_bucket_minutes: int = Field(default=10, ge=1, le=240)
    failed_thumbnails: int = Field(default=6, ge=0, le=50)

    # review
    review_pass_sample_rate: float = Field(
        default=0.02, ge=0.0, le=1.0, description="share of PASS modules put in the review queue"
    )

    # frame retention (serving/retention.py): opt-in, the factory decides how long frames are kept
    frame_retention_days: int | None = Field(
        default=None,
        description="delete the frame files of PASS modules older than this many days that no engineer "
        "flagged, sampled or reviewed (their verdicts and cells stay); unset: keep every frame",
    )
    frame_retention_interval_seconds: float = Field(
        default=3600.0, gt=0.0, description="how often the frame retention pass runs (also once at start)"
    )

    @field_validator("timezone")
    @classmethod
    def _an_iana_zone(cls, name: str) -> str:
        if name:
            try:
                ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError, OSError) as exc:  # OSError: "Europe" is a folder
                raise ValueError(
                    f"expected an IANA time zone name such as Europe/Berlin, got {name!r}"
                ) from exc
        return name

    @field_validator("frame_retention_days", mode="before")
    @classmethod
    def _retention_unset_when_empty(cls, value: object) -> object:
        # a ConfigMap often carries the key with an empty value: that means "not set", keep every frame
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("frame_retention_days")
    @classmethod
    def _retention_of_whole_days(cls, days: int | None) -> int | None:
        if days is not None and not 1 <= days <= MAX_RETENTION_DAYS:
            raise ValueError(
                f"expected PVQC_FRAME_RETENTION_DAYS from 1 to {MAX_RETENTION_DAYS} (days a PASS module's "
                f"frame is kept), got {days}; leave it unset to keep every frame"
            )
        return days

    @model_validator(mode="after")
    def _lines_not_empty(self) -> Settings:
        if not self.lines:
            raise ValueError("expected at least one line in PVQC_LINES")
        return self

    @model_validator(mode="after")
    def _queue_holds_a_module(self) -> Settings:
        # a half cell is two model inputs: a queue smaller than that refuses the line's every frame
        largest = max(self.lines.items(), key=lambda item: item[1].rows * item[1].cols)
        needed = 2 * largest[1].rows * largest[1].cols
        if self.max_queue_cells < needed:
            raise ValueError(
                f"max_queue_cells {self.max_queue_cells} cannot hold one module of line {largest[0]!r} "
                f"({largest[1].rows}x{largest[1].cols}, two model inputs per half cell): expected >= {needed}"
            )
        return self

    @property
    def resolved_inference_workers(self) -> int:
        return self.inference_workers or usable_cores()

    @property
    def resolved_frame_workers(self) -> int:
        return self.frame_workers or usable_cores()

    @property
    def session_threads(self) -> int:
        """Intra-op threads of each onnxruntime call: the cores shared out among the workers."""
        return self.ort_threads or max(1, usable_cores() // self.resolved_inference_workers)

    @property
    def zone(self) -> tzinfo:
        """The time zone shift start times are read in, with its daylight-saving rules."""
        return ZoneInfo(self.timezone) if self.timezone else local_zone()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir / 'pvqc.db'}"

    @property
    def resolved_frames_dir(self) -> Path:
        return self.frames_dir or self.var_dir / "frames"


def local_zone() -> tzinfo:
    """The machine's time zone with its rules: what `TZ` names, else /etc/localtime (as libc reads them)."""
    name = os.environ.get("TZ")
    if name == "":
        return UTC  # TZ set but empty means UTC to the C library
    spec = "/etc/localtime" if name is None else name.removeprefix(":")
    try:
        if spec.startswith("/"):
            with Path(spec).open("rb") as file:
                return ZoneInfo.from_file(file)
        return ZoneInfo(spec)
    except (OSError, ValueError, ZoneInfoNotFoundError):
        # a POSIX rule string (TZ=CET-1CEST,...) or no zone files: today's offset, as before the
        # `timezone` setting existed (setting it brings the daylight-saving rules)
        return datetime.now().astimezone().tzinfo or UTC


def _starts(line: LineConfig, days: Iterable[date], zone: tzinfo) -> list[datetime]:
    """The line's shift starts on these dates, as UTC instants in order.

    Built per date with the zone's rules: a shift on the far side of a daylight-saving change is not
    an hour off, as `replace()` or +-1 day on a fixed-offset datetime (today's offset) would make it.
    Compared in UTC: aware datetimes sharing a tzinfo compare by wall time, wrong in the repeated hour.
    """
    return sorted(
        datetime.combine(day, s, tzinfo=zone).astimezone(UTC) for day in days for s in line.shift_starts
    )


def shift_start(line: LineConfig, now: datetime, zone: tzinfo) -> datetime:
    """The latest configured shift start at or before `now` (an aware datetime), in `zone`."""
    today = now.astimezone(zone).date()
    # yesterday's starts all lie before today's midnight, so the list is never empty
    begun = [t for t in _starts(line, (today - timedelta(days=1), today), zone) if t <= now]
    return begun[-1].astimezone(zone)


def shift_end(line: LineConfig, start: datetime, zone: tzinfo) -> datetime:
    """When the shift that began at `start` ends: the next configured shift start after it, in `zone`.

    With one start a day, the same wall-clock time the next day (23 or 25 hours across a change)."""
    day = start.astimezone(zone).date()
    return next(t for t in _starts(line, (day, day + timedelta(days=1)), zone) if t > start).astimezone(zone)
