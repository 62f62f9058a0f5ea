"""`pvqc export-reviewed`: reviewed cells leave the store as PNG files plus a manifest, labelled by
the engineers' latest decisions, cut with the stored polygons; incremental and reproducible."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient

from pvqc import main as pvqc_main
from serving.app import create_app
from serving.export_reviewed import MANIFEST_FILE, export_reviewed
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, BRIGHT, DARK, MID, module_frame, png


def post(client: TestClient, serial: str, cells: dict[tuple[int, int], int]) -> int:
    levels = np.full((6, 10), BRIGHT)
    for place, level in cells.items():
        levels[place] = level
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    response = client.post("/lines/L1/modules", content=png(module_frame(levels)), headers=headers)
    assert response.status_code == 201, response.text
    return int(response.json()["inspection_id"])


def decide(client: TestClient, inspection_id: int, body: dict[str, Any]) -> None:
    response = client.post(f"/review/inspections/{inspection_id}/decisions", json=body)
    assert response.status_code == 201, response.text


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    records = [json.loads(line) for line in (folder / MANIFEST_FILE).read_text().splitlines()]
    return {f"{r['inspection_id']}:{r['row']},{r['col']}": r for r in records}


def test_labels_follow_the_latest_decisions_and_exports_are_incremental(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    settings = make_settings()
    out = tmp_path / "reviewed"
    with TestClient(create_app(settings), headers=AUTH) as client:
        passed = post(client, "P", {(0, 0): MID})  # uncertain cell; the engineer passes the module
        failed = post(client, "F", {(1, 1): DARK, (2, 2): MID})  # failed, one cell labelled by hand
        post(client, "U", {(3, 3): DARK})  # never reviewed: not exported
        decide(client, passed, {"module": "PASS"})
        decide(
            client,
            failed,
            {"module": "FAIL", "cells": [{"row": 1, "col": 1, "label": "defective", "defect_type": "crack"}]},
        )
        services = client.app.state.services  # type: ignore[attr-defined]
        first = export_reviewed(services.sessions, services.frames, out, cell_size=48)
        records = manifest(out)
        # PASS: all 60 cells functional; FAIL: 59 (the uncertain cell 2,2 has no label)
        assert first.cells == 60 + 59 and first.new == first.cells and first.modules == 2
        assert records[f"{passed}:0,0"]["label"] == "functional"
        assert records[f"{passed}:0,0"]["label_source"] == "module_decision"
        assert (
            records[f"{failed}:1,1"]["label"] == "defective"
            and records[f"{failed}:1,1"]["defect_type"] == "crack"
        )
        assert records[f"{failed}:1,1"]["label_source"] == "cell_decision"
        assert f"{failed}:2,2" not in records
        cell = records[f"{failed}:1,1"]
        assert cell["model_version"] == "0.0.0-test" and cell["serial"] == "F" and cell["reviewer"]
        assert cell["frame_sha256"] and len(cell["polygon"]) == 4 and cell["cell_size"] == 48
        image = (out / cell["file"]).read_bytes()
        import cv2

        pixels = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert pixels.shape == (48, 48) and pixels[20:28, 20:28].mean() < 60  # the dark cell, as cut

        # a later decision changes a label: the manifest follows, no cell is cut again
        decide(client, failed, {"cells": [{"row": 1, "col": 1, "label": "functional"}]})
        second = export_reviewed(services.sessions, services.frames, out, cell_size=48)
        assert second.new == 0 and second.reused == second.cells == first.cells
        assert manifest(out)[f"{failed}:1,1"]["label"] == "functional"
        text = (out / MANIFEST_FILE).read_text()

    # the command line gives the same manifest from the same store
    again = tmp_path / "again"
    code = pvqc_main(
        ["export-reviewed", "--out", str(again), "--cell-size", "48", "--var-dir", str(settings.var_dir)]
    )
    assert code == 0
    assert (again / MANIFEST_FILE).read_text() == text
