"""Read routes: inspection lists (filters, pagination), line statistics windows, metrics, settings."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from serving.app import create_app
from serving.routes.lines import shift_start
from serving.settings import DEFAULT_MODEL_DIR, LineConfig, Settings
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, BRIGHT, DARK, module_frame, png


def post(client: TestClient, serial: str, dark: bool, line: str = "L1") -> dict:
    levels = np.full((6, 10), BRIGHT)
    if dark:
        levels[0, 0] = DARK
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    rows, cols = (6, 10) if line == "L1" else (6, 24)
    levels = np.full((rows, cols), BRIGHT) if line != "L1" else levels
    response = client.post(f"/lines/{line}/modules", content=png(module_frame(levels)), headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def test_list_filter_paginate_and_stats(client: TestClient) -> None:
    verdicts = [post(client, f"S{i}", dark=i % 3 == 0)["verdict"] for i in range(7)]  # 3 FAIL, 4 PASS
    post(client, "W1", dark=False, line="L2")
    assert verdicts.count("FAIL") == 3

    page = client.get("/inspections", params={"line_id": "L1", "limit": 3}).json()
    seen = [item["serial"] for item in page["items"]]
    while page["next_before_id"] is not None:
        page = client.get(
            "/inspections", params={"line_id": "L1", "limit": 3, "before_id": page["next_before_id"]}
        ).json()
        seen += [item["serial"] for item in page["items"]]
    assert seen == [f"S{i}" for i in reversed(range(7))]  # newest first, each once

    failed = client.get("/inspections", params={"verdict": "FAIL"}).json()["items"]
    assert {i["serial"] for i in failed} == {"S0", "S3", "S6"}
    since = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    assert len(client.get("/inspections", params={"since": since}).json()["items"]) == 8
    future = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
    assert client.get("/inspections", params={"since": future}).json()["items"] == []
    assert client.get("/inspections", params={"since": "2026-01-01T00:00:00"}).status_code == 422

    last = client.get("/lines/L1/stats", params={"last": 4}).json()
    assert last["modules"] == 4 and last["counts"] == {"PASS": 2, "REVIEW": 0, "FAIL": 2}  # S6..S3
    assert last["pass_rate"] == 0.5 and last["below_floor"] is True
    hour = client.get("/lines/L1/stats", params={"window": "hour"}).json()
    assert hour["modules"] == 7 and hour["counts"]["FAIL"] == 3
    shift = client.get("/lines/L1/stats", params={"window": "shift"}).json()
    assert shift["modules"] == 7  # every shift start is in the past, all posts are after it
    other = client.get("/lines/L2/stats").json()
    assert other["modules"] == 1 and other["pass_rate"] == 1.0


def test_shift_start_is_the_latest_begun_shift() -> None:
    line = LineConfig(shift_starts=[time(6), time(14), time(22)])
    day = datetime(2026, 3, 2, 15, 30, tzinfo=UTC)
    assert shift_start(line, day, UTC) == datetime(2026, 3, 2, 14, 0, tzinfo=UTC)
    assert shift_start(line, day.replace(hour=3), UTC) == datetime(2026, 3, 1, 22, 0, tzinfo=UTC)


def test_metrics_exposes_the_issue_s_series(sqlite_client: TestClient) -> None:
    post(sqlite_client, "m1", dark=True)
    text = sqlite_client.get("/metrics").text
    for series in (
        "pvqc_request_seconds_bucket",
        "pvqc_inference_seconds_bucket",
        "pvqc_batch_cells_bucket",
        "pvqc_queue_cells",
        'pvqc_verdicts_total{kind="module",line="L1",model_version="0.0.0-test",verdict="FAIL"} 1.0',
        'route="/lines/{line_id}/modules"',
    ):
        assert series in text, series


def test_settings_default_to_embedded_mode_and_read_env(monkeypatch) -> None:
    defaults = Settings()
    assert defaults.resolved_database_url == "sqlite:///var/pvqc.db"
    assert str(defaults.resolved_frames_dir) == "var/frames"
    assert defaults.model_dir == DEFAULT_MODEL_DIR
    monkeypatch.setenv("PVQC_LINES", '{"A7": {"rows": 12, "cols": 12, "takt_seconds": 20}}')
    monkeypatch.setenv("PVQC_DATABASE_URL", "postgresql+psycopg://db/pvqc")
    configured = Settings()
    assert configured.lines["A7"].rows == 12 and configured.lines["A7"].takt_seconds == 20
    assert configured.resolved_database_url == "postgresql+psycopg://db/pvqc"


def test_inference_workers_share_out_the_cores(monkeypatch) -> None:
    monkeypatch.setattr("serving.settings.usable_cores", lambda: 8)
    assert (Settings().resolved_inference_workers, Settings().session_threads) == (8, 1)
    assert Settings(inference_workers=2).session_threads == 4
    assert Settings(inference_workers=2, ort_threads=3).session_threads == 3
    assert Settings(inference_workers=16).session_threads == 1


def test_lines_are_listed(sqlite_client: TestClient) -> None:
    lines = sqlite_client.get("/lines").json()
    assert set(lines) == {"L1", "L2"} and lines["L2"]["cols"] == 24
    health = sqlite_client.get("/healthz").json()
    assert health["model"]["version"] == "0.0.0-test"
    assert health["live"] == {"status": "ok", "clients": 0}  # the screens' stream is running


def test_a_line_of_one_row_or_column_is_refused_at_configuration() -> None:
    with pytest.raises(ValidationError, match="greater than or equal to 2"):
        Settings(lines={"L3": {"rows": 1, "cols": 10}})


def test_a_line_without_shift_starts_is_refused_at_configuration() -> None:
    with pytest.raises(ValidationError, match="expected at least one shift start"):
        LineConfig(shift_starts=[])
    with pytest.raises(ValidationError, match="shift_starts"):
        Settings(lines={"L3": {"rows": 1, "cols": 1, "shift_starts": []}})


def test_server_errors_are_timed_too(make_settings: MakeSettings) -> None:
    app = create_app(make_settings())

    async def broken() -> None:
        raise RuntimeError("a bug in a route")

    app.add_api_route("/broken", broken)
    with TestClient(app, headers=AUTH, raise_server_exceptions=False) as client:
        assert client.get("/broken").status_code == 500
        text = client.get("/metrics").text
    assert 'pvqc_request_seconds_count{method="GET",route="/broken",status="500"} 1.0' in text
