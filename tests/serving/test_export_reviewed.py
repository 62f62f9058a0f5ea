"""`pvqc export-reviewed`: reviewed cells leave the store as PNG files plus a manifest, labelled by
the engineers' latest decisions, cut with the stored polygons; incremental and reproducible; a folder
keeps its line filter; the split key is the module serial; the command fails in one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from datasets import reviewed
from pvqc import main as pvqc_main
from serving.app import create_app
from serving.export_reviewed import FORMAT, MANIFEST_FILE, ExportError, export_reviewed
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, BRIGHT, DARK, MID, module_frame, png

COLS = {"L1": 10, "L2": 24}  # the test lines' layouts (conftest's make_settings)


def post(client: TestClient, serial: str, cells: dict[tuple[int, int], int], line: str = "L1") -> int:
    levels = np.full((6, COLS[line]), BRIGHT)
    for place, level in cells.items():
        levels[place] = level
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    response = client.post(f"/lines/{line}/modules", content=png(module_frame(levels)), headers=headers)
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


def test_a_folder_keeps_the_line_filter_it_was_exported_with(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    settings = make_settings()
    out = tmp_path / "reviewed"
    with TestClient(create_app(settings), headers=AUTH) as client:
        decide(client, post(client, "A", {}, "L1"), {"module": "PASS"})
        decide(client, post(client, "B", {}, "L2"), {"module": "PASS"})
        services = client.app.state.services  # type: ignore[attr-defined]
        full = export_reviewed(services.sessions, services.frames, out, cell_size=32)
        assert full.cells == 60 + 144 and {r["line_id"] for r in manifest(out).values()} == {"L1", "L2"}
        text = (out / MANIFEST_FILE).read_text()
        # --line L1 into the folder of all lines would leave L2's PNGs there but drop them from the manifest
        with pytest.raises(ExportError, match=r"exported with all lines \(no --line\), not --line L1"):
            export_reviewed(services.sessions, services.frames, out, cell_size=32, line_id="L1")
        assert (out / MANIFEST_FILE).read_text() == text

        one_line = tmp_path / "l1"
        export_reviewed(services.sessions, services.frames, one_line, cell_size=32, line_id="L1")
        again = export_reviewed(services.sessions, services.frames, one_line, cell_size=32, line_id="L1")
        assert again.cells == again.reused == 60
        with pytest.raises(ExportError, match="exported with --line L1, not all lines"):
            export_reviewed(services.sessions, services.frames, one_line, cell_size=32)
        with pytest.raises(ExportError, match="exported with --line L1, not --line L2"):
            export_reviewed(services.sessions, services.frames, one_line, cell_size=32, line_id="L2")
        assert {r["line_id"] for r in manifest(one_line).values()} == {"L1"}


def test_a_module_retested_on_a_rework_line_falls_on_one_side_of_the_split(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    out = tmp_path / "reviewed"
    with TestClient(create_app(make_settings()), headers=AUTH) as client:
        # keyed on line/serial, L1/SN0001 fell in train and L2/SN0001 in test: the module leaked
        decide(client, post(client, "SN0001", {}, "L1"), {"module": "PASS"})
        decide(client, post(client, "SN0001", {}, "L2"), {"module": "PASS"})
        services = client.app.state.services  # type: ignore[attr-defined]
        export_reviewed(services.sessions, services.frames, out, cell_size=32)
    records = list(manifest(out).values())
    assert {r["line_id"] for r in records} == {"L1", "L2"} and len(records) == 60 + 144
    assert {r["module"] for r in records} == {"SN0001"} and {r["format"] for r in records} == {FORMAT}
    sides = {part: len(reviewed.load_reviewed(out, part, size=32)) for part in reviewed.Part}
    assert sorted(sides.values()) == [0, 0, 60 + 144]  # every inspection of the module on one side


def test_a_folder_exported_with_the_old_split_key_is_refused(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    out = tmp_path / "reviewed"
    out.mkdir()
    old = {"file": "cells/00000001_r00_c00.png", "sha256": "0", "label": "functional", "module": "L1/A"}
    (out / MANIFEST_FILE).write_text(json.dumps({**old, "format": "pvqc-reviewed-1"}) + "\n")
    with TestClient(create_app(make_settings()), headers=AUTH) as client:
        decide(client, post(client, "A", {}), {"module": "PASS"})
        services = client.app.state.services  # type: ignore[attr-defined]
        with pytest.raises(ExportError, match=r"older format .* expected a folder of format pvqc-reviewed-2"):
            export_reviewed(services.sessions, services.frames, out, cell_size=32)
    assert json.loads((out / MANIFEST_FILE).read_text())["module"] == "L1/A"  # left as it was


def test_the_reader_expects_the_format_the_exporter_writes() -> None:
    assert reviewed.FORMAT == FORMAT


def export_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Exit status and stderr of `pvqc export-reviewed`; the stderr must be one line."""
    code = pvqc_main(["export-reviewed", *args])
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1 and "Traceback" not in err, err
    return code, err


def test_the_command_refuses_a_cell_size_too_small_to_show_a_cell(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, var = tmp_path / "out", tmp_path / "var"
    for size in ("0", "-3", "x", "15"):
        with pytest.raises(SystemExit) as exit_info:
            pvqc_main(["export-reviewed", "--out", str(out), "--cell-size", size, "--var-dir", str(var)])
        assert exit_info.value.code == 2
        assert "--cell-size: expected a whole number of pixels >= 16" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_the_command_refuses_a_var_dir_without_a_database(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out, var = tmp_path / "out", tmp_path / "mistyped-var"
    code, err = export_cli(capsys, "--out", str(out), "--var-dir", str(var))
    assert code == 2 and f"no database at {var / 'pvqc.db'}; expected the service's SQLite file" in err
    missing = tmp_path / "elsewhere" / "pvqc.db"
    code, err = export_cli(capsys, "--out", str(out), "--database-url", f"sqlite:///{missing}")
    assert code == 2 and f"no database at {missing}" in err
    assert list(tmp_path.iterdir()) == []  # no stray pvqc.db, frames/ or export folder


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("nosuchdb://host/db", "cannot read the service's database at nosuchdb://host/db: Can't load plugin"),
        ("not a url", "'not a url' is not a database URL"),
        ("sqlite:///{var}/empty.db", "no such table"),  # a file, but not a pvqc service's database
    ],
    ids=["unknown-dialect", "not-a-url", "not-a-pvqc-database"],
)
def test_the_command_turns_database_errors_into_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, url: str, expected: str
) -> None:
    var = tmp_path / "var"
    (var / "frames").mkdir(parents=True)
    (var / "empty.db").write_bytes(b"")
    url = url.format(var=var)
    code, err = export_cli(
        capsys, "--out", str(tmp_path / "out"), "--var-dir", str(var), "--database-url", url
    )
    assert code == 2 and err.startswith("pvqc export-reviewed: ") and expected in err and "expected" in err
    assert not (tmp_path / "out").exists()


def test_the_command_refuses_another_line_filter_in_one_line(
    make_settings: MakeSettings, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = make_settings()
    with TestClient(create_app(settings), headers=AUTH) as client:
        decide(client, post(client, "A", {}), {"module": "PASS"})
    out = ["--out", str(tmp_path / "reviewed"), "--cell-size", "32", "--var-dir", str(settings.var_dir)]
    assert pvqc_main(["export-reviewed", *out]) == 0
    code, err = export_cli(capsys, *out, "--line", "L1")
    assert code == 2 and "exported with all lines (no --line), not --line L1" in err


def test_a_half_cell_is_exported_in_proportion_and_read_back_as_the_views_serving_judged(
    make_settings: MakeSettings, tmp_path: Path
) -> None:
    import cv2

    from model.preprocess import image_views

    out = tmp_path / "reviewed"
    half = np.full((40, 80), BRIGHT, np.uint8)
    half[:, :20] = DARK  # not symmetric: the two mirrored views differ
    with TestClient(create_app(make_settings()), headers=AUTH) as client:
        headers = {"Content-Type": "image/png", "X-Module-Serial": "H", "X-Frame-Id": "1"}
        response = client.post("/lines/L1/cells", content=png(half), headers=headers)
        assert response.status_code == 201, response.text
        inspection = int(response.json()["inspection_id"])
        decide(
            client,
            inspection,
            {"module": "FAIL", "cells": [{"row": 0, "col": 0, "label": "defective", "defect_type": "crack"}]},
        )
        services = client.app.state.services  # type: ignore[attr-defined]
        export_reviewed(services.sessions, services.frames, out, cell_size=48)
    record = manifest(out)[f"{inspection}:0,0"]
    stored = cv2.imread(str(out / record["file"]), cv2.IMREAD_GRAYSCALE)
    assert stored.shape == (24, 48)  # half as tall as wide, as it was photographed
    cells = reviewed.load_reviewed(out, size=48)
    assert len(cells) == 2 and len(set(cells.names)) == 1 and list(cells.probabilities) == [1.0, 1.0]
    np.testing.assert_array_equal(cells.images, image_views(half, 48))  # the pixels serving judged
