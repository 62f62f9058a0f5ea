"""Shift windows: start and end in the configured time zone, across daylight-saving changes and
midnight, the `timezone` setting, and the snapshot and stats routes that use them."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serving.app import create_app
from serving.settings import LineConfig, Settings, shift_end, shift_start
from serving.snapshots import line_snapshot
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH

BERLIN = ZoneInfo("Europe/Berlin")
THREE_SHIFTS = LineConfig(shift_starts=[time(6), time(14), time(22)])


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        # 2024-03-31 02:00 CET -> 03:00 CEST: the night shift 22:00 CET .. 06:00 CEST lasts 7 hours
        (utc(2024, 3, 31, 3, 0), utc(2024, 3, 30, 21, 0), utc(2024, 3, 31, 4, 0)),
        # the same night shift, seen before midnight
        (utc(2024, 3, 30, 22, 30), utc(2024, 3, 30, 21, 0), utc(2024, 3, 31, 4, 0)),
        # the day after the change, early shift: 06:00 CEST = 04:00 UTC
        (utc(2024, 3, 31, 4, 0), utc(2024, 3, 31, 4, 0), utc(2024, 3, 31, 12, 0)),
        # 2024-10-27 03:00 CEST -> 02:00 CET: the night shift 22:00 CEST .. 06:00 CET lasts 9 hours
        (utc(2024, 10, 27, 4, 30), utc(2024, 10, 26, 20, 0), utc(2024, 10, 27, 5, 0)),
        # in the repeated hour (02:30 CET, the second time round)
        (utc(2024, 10, 27, 1, 30), utc(2024, 10, 26, 20, 0), utc(2024, 10, 27, 5, 0)),
        # the late shift of the day before the spring change: 14:00 CET .. 22:00 CET
        (utc(2024, 3, 30, 20, 59), utc(2024, 3, 30, 13, 0), utc(2024, 3, 30, 21, 0)),
    ],
)
def test_shift_windows_across_daylight_saving_changes(now: datetime, start: datetime, end: datetime) -> None:
    begun = shift_start(THREE_SHIFTS, now, BERLIN)
    assert begun == start and begun.tzinfo is BERLIN  # shown in the factory's time, compared as instants
    assert shift_end(THREE_SHIFTS, begun, BERLIN) == end


def test_a_single_shift_lasts_a_calendar_day_in_the_zone() -> None:
    one = LineConfig(shift_starts=[time(6)])
    begun = shift_start(one, utc(2024, 3, 31, 3, 0), BERLIN)  # 05:00 CEST: yesterday's shift still runs
    assert begun == utc(2024, 3, 30, 5, 0)  # 06:00 CET
    assert shift_end(one, begun, BERLIN) == utc(2024, 3, 31, 4, 0)  # 06:00 CEST: 23 hours


def test_the_timezone_setting_is_an_iana_name(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(timezone="Europe/Berlin").zone == BERLIN
    monkeypatch.setenv("PVQC_TIMEZONE", "America/Chicago")
    assert Settings().zone == ZoneInfo("America/Chicago")
    with pytest.raises(ValidationError, match="expected an IANA time zone name"):
        Settings(timezone="Europe/Atlantis")
    for wrong in ("../../etc/passwd", "Europe", "x" * 300):  # a path, a folder of zones, too long a name
        with pytest.raises(ValidationError, match="expected an IANA time zone name"):
            Settings(timezone=wrong)


def test_the_default_zone_is_the_machine_s_with_its_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, the machine's zone, as before the setting existed, but with its daylight-saving rules."""
    monkeypatch.delenv("PVQC_TIMEZONE", raising=False)
    monkeypatch.setenv("TZ", "Europe/Berlin")
    zone = Settings().zone
    assert shift_start(THREE_SHIFTS, utc(2024, 3, 31, 3, 0), zone) == utc(2024, 3, 30, 21, 0)
    monkeypatch.setenv("TZ", ":Etc/UTC")
    assert Settings().zone.utcoffset(datetime(2024, 7, 1)) == timedelta(0)


def test_the_snapshot_s_shift_is_in_the_configured_zone(make_settings: MakeSettings) -> None:
    settings = make_settings(timezone="Europe/Berlin")
    with TestClient(create_app(settings), headers=AUTH) as client:
        sessions = client.app.state.services.sessions  # type: ignore[attr-defined]
        snapshot = line_snapshot(sessions, settings, "L1", utc(2024, 3, 31, 3, 0))
    assert snapshot["shift_start"] == "2024-03-30T21:00:00+00:00"
    assert snapshot["shift_end"] == "2024-03-31T04:00:00+00:00"


def test_the_shift_stats_window_starts_in_the_configured_zone(make_settings: MakeSettings) -> None:
    # India keeps a half-hour offset and no daylight saving: its shift starts are at :30 UTC
    zone = ZoneInfo("Asia/Kolkata")
    settings = make_settings(timezone="Asia/Kolkata")
    with TestClient(create_app(settings), headers=AUTH) as client:
        body = client.get("/lines/L1/stats", params={"window": "shift"}).json()
    since = datetime.fromisoformat(body["since"])
    assert since == shift_start(settings.lines["L1"], datetime.now(UTC), zone)
    assert since.astimezone(UTC).minute == 30
