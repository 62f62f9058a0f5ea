"""The engineers' review: queue and filters, decisions into the append-only audit trail, effective
labels, heat maps, and decisions surviving a restart (on SQLite and PostgreSQL)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from serving.app import create_app
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, BRIGHT, DARK, MID, module_frame, png


def post(client: TestClient, serial: str, level: int | None = None, cell: tuple[int, int] = (1, 2)) -> int:
    levels = np.full((6, 10), BRIGHT)
    if level is not None:
        levels[cell] = level
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    response = client.post("/lines/L1/modules", content=png(module_frame(levels)), headers=headers)
    assert response.status_code == 201, response.text
    return int(response.json()["inspection_id"])


def decide(client: TestClient, inspection_id: int, body: dict[str, Any]) -> Any:
    return client.post(f"/review/inspections/{inspection_id}/decisions", json=body)


def test_queue_holds_flagged_modules_and_filters(client: TestClient) -> None:
    failed = post(client, "F1", DARK)
    review = post(client, "R1", MID)
    post(client, "P1")
    queue = client.get("/review/queue").json()["items"]
    assert [i["inspection_id"] for i in queue] == [review, failed]  # newest first, no PASS (2% sample)
    assert [i["serial"] for i in client.get("/review/queue", params={"verdict": "FAIL"}).json()["items"]] == [
        "F1"
    ]
    assert client.get("/review/queue", params={"model_version": "9.9"}).json()["items"] == []
    assert client.get("/review/queue", params={"line_id": "L2"}).json()["items"] == []
    future = "2099-01-01T00:00:00Z"
    assert client.get("/review/queue", params={"since": future}).json()["items"] == []

    assert decide(client, failed, {"module": "FAIL"}).status_code == 201
    pending = client.get("/review/queue").json()["items"]
    assert [i["serial"] for i in pending] == ["R1"]  # decided modules leave the pending queue
    reviewed = client.get("/review/queue", params={"state": "reviewed"}).json()["items"]
    assert [(i["serial"], i["reviewed"]["verdict"]) for i in reviewed] == [("F1", "FAIL")]


def test_sampled_pass_modules_join_the_queue(make_settings: MakeSettings) -> None:
    with TestClient(create_app(make_settings(review_pass_sample_rate=1.0)), headers=AUTH) as client:
        passed = post(client, "P1")
        item = client.get("/review/queue").json()["items"][0]
        assert item["inspection_id"] == passed and item["sampled"] is True


def test_decisions_are_appended_with_before_and_after(client: TestClient) -> None:
    inspection = post(client, "F1", DARK, cell=(1, 2))
    first = decide(
        client,
        inspection,
        {"module": "PASS", "cells": [{"row": 1, "col": 2, "label": "functional"}], "note": "dust on glass"},
    )
    assert first.status_code == 201, first.text
    rows = {d["target"]: d for d in first.json()}
    assert rows["module"]["before"] == {"verdict": "FAIL", "source": "model"}
    assert rows["module"]["after"] == {"verdict": "PASS", "source": "review"}
    assert rows["cell"]["before"]["label"] == "defective" and rows["cell"]["before"]["source"] == "model"
    assert rows["cell"]["reviewer"] == "admin" and rows["cell"]["note"] == "dust on glass"

    second = decide(
        client, inspection, {"cells": [{"row": 1, "col": 2, "label": "defective", "defect_type": "crack"}]}
    )
    assert second.json()[0]["before"] == {"label": "functional", "defect_type": None, "source": "review"}

    trail = client.get("/review/decisions", params={"inspection_id": inspection}).json()
    assert [(d["target"], d["after"].get("label") or d["after"]["verdict"]) for d in trail] == [
        ("module", "PASS"),
        ("cell", "functional"),
        ("cell", "defective"),
    ]
    one = client.get(f"/review/inspections/{inspection}").json()
    assert one["module_label"]["verdict"] == "PASS"
    assert one["cell_labels"]["1,2"] == {"label": "defective", "defect_type": "crack", "source": "review"}
    assert one["cell_labels"]["0,0"]["source"] == "model" and len(one["history"]) == 3

    labels = client.get("/review/labels").json()["items"]
    assert [item["inspection_id"] for item in labels] == [inspection]
    cell = next(c for c in labels[0]["cells"] if (c["row"], c["col"]) == (1, 2))
    assert cell["label"] == "defective" and cell["defect_type"] == "crack" and cell["polygon"]


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({}, 422, "module verdict, cell labels"),
        ({"module": "REVIEW"}, 422, "module"),
        ({"cells": [{"row": 0, "col": 0, "label": "defective"}]}, 422, "defect_type"),
        (
            {"cells": [{"row": 0, "col": 0, "label": "functional", "defect_type": "crack"}]},
            422,
            "no defect_type",
        ),
        (
            {"cells": [{"row": 0, "col": 0, "label": "defective", "defect_type": "scratch"}]},
            422,
            "defect_type",
        ),
        ({"cells": [{"row": 9, "col": 0, "label": "functional"}]}, 400, "no cell at row 9"),
    ],
)
def test_bad_decisions_are_refused(client: TestClient, body: dict[str, Any], status: int, words: str) -> None:
    inspection = post(client, "F1", DARK)
    response = decide(client, inspection, body)
    assert response.status_code == status and words in response.json()["error"]
    assert decide(client, 999_999, {"module": "PASS"}).status_code == 404
    assert client.get("/review/decisions").json() == []


def test_the_audit_trail_cannot_be_edited(client: TestClient) -> None:
    inspection = post(client, "F1", DARK)
    decision = decide(client, inspection, {"module": "FAIL"}).json()[0]
    for method in ("PUT", "PATCH", "DELETE"):
        for path in (
            "/review/decisions",
            f"/review/decisions/{decision['id']}",
            f"/review/inspections/{inspection}/decisions",
        ):
            assert client.request(method, path).status_code in (404, 405), (method, path)
    # and not around the API either: the database refuses UPDATE and DELETE
    engine = client.app.state.services.engine  # type: ignore[attr-defined]
    for statement in ("UPDATE review_decisions SET reviewer = 'mallory'", "DELETE FROM review_decisions"):
        with pytest.raises(DBAPIError, match="append-only"), engine.begin() as connection:
            connection.execute(text(statement))
    assert client.get("/review/decisions").json()[0] == decision


def test_a_decision_survives_a_restart(make_settings: MakeSettings, database_url: str) -> None:
    settings = make_settings(database_url=database_url)
    with TestClient(create_app(settings), headers=AUTH) as client:
        inspection = post(client, "F1", DARK)
        made = decide(client, inspection, {"module": "PASS", "note": "false alarm"}).json()
    with TestClient(create_app(settings), headers=AUTH) as client:  # a new process's app, same store
        assert client.get("/review/decisions").json() == made
        assert client.get(f"/review/inspections/{inspection}").json()["module_label"]["verdict"] == "PASS"
        assert len(client.get("/keys").json()) == 1  # and the first start did not run twice


def test_heat_map_of_a_flagged_cell(client: TestClient) -> None:
    inspection = post(client, "F1", DARK, cell=(1, 2))
    heat = client.get(f"/review/inspections/{inspection}/cells/1/2/heatmap")
    assert heat.status_code == 200, heat.text
    body = heat.json()
    assert np.asarray(body["cam"]).shape == (4, 4)  # the tiny model's activation grid
    assert body["probability"] > 0.7 and abs(body["probability"] - body["stored_probability"]) < 0.05
    assert body["cell_png"].startswith("data:image/png;base64,")
    assert client.get(f"/review/inspections/{inspection}/cells/7/2/heatmap").status_code == 404
    preview = client.get(f"/inspections/{inspection}/preview", params={"width": 200})
    assert preview.headers["content-type"] == "image/jpeg" and preview.content[:3] == b"\xff\xd8\xff"


def test_previews_are_made_once_and_kept(client: TestClient) -> None:
    inspection = post(client, "F1", DARK)
    services = client.app.state.services  # type: ignore[attr-defined]
    first = client.get(f"/inspections/{inspection}/preview", params={"width": 300})
    kept = list(services.previews.root.glob("*.jpg"))
    assert [p.name.rsplit("-", 1)[1] for p in kept] == ["360.jpg"]  # 300 snaps up to 360
    assert kept[0].read_bytes() == first.content
    kept[0].write_bytes(b"from the cache")  # served from the file now, not decoded again
    again = client.get(f"/inspections/{inspection}/preview", params={"width": 360})
    assert again.content == b"from the cache" and again.headers["cache-control"] == "private, max-age=86400"


def test_a_preview_whose_cache_write_fails_is_served_and_leaves_no_temp_file(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import pathlib

    inspection = post(client, "F1", DARK)
    services = client.app.state.services  # type: ignore[attr-defined]

    def disk_full(self: pathlib.Path, target: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pathlib.Path, "replace", disk_full)
    preview = client.get(f"/inspections/{inspection}/preview", params={"width": 360})
    assert preview.status_code == 200 and preview.content[:3] == b"\xff\xd8\xff"
    assert list(services.previews.root.iterdir()) == []  # neither a preview nor an orphaned temp file


def test_heat_map_while_the_queue_is_full_is_503_with_retry_after(sqlite_client: TestClient) -> None:
    inspection = post(sqlite_client, "F1", DARK)
    services = sqlite_client.app.state.services  # type: ignore[attr-defined]
    services.batcher.max_queue_cells = 0  # saturated: every new job is refused
    heat = sqlite_client.get(f"/review/inspections/{inspection}/cells/1/2/heatmap")
    assert heat.status_code == 503, heat.text
    assert "queue is full" in heat.json()["error"]
    assert heat.headers["Retry-After"] == str(services.settings.retry_after_seconds)  # as ingestion says


def test_two_engineers_deciding_at_once_take_turns(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    import serving.review

    inspection = post(client, "RACE", MID)  # REVIEW
    real = serving.review.effective_labels

    def slow_read(*args: Any) -> Any:  # widens the read-then-append window
        labels = real(*args)
        time.sleep(0.3)
        return labels

    monkeypatch.setattr(serving.review, "effective_labels", slow_read)
    answers: list[int] = []

    def decide_as(verdict: str) -> None:
        answers.append(decide(client, inspection, {"module": verdict}).status_code)

    engineers = [threading.Thread(target=decide_as, args=(v,)) for v in ("FAIL", "PASS")]
    for engineer in engineers:
        engineer.start()
    for engineer in engineers:
        engineer.join()
    assert answers == [201, 201]
    first, second = client.get("/review/decisions", params={"inspection_id": inspection}).json()
    # the second saw the first's decision as what was in force, not the model's REVIEW
    assert first["before"]["verdict"] == "REVIEW"
    assert second["before"]["verdict"] == first["after"]["verdict"]
