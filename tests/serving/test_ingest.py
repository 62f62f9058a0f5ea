"""Frames in, verdicts out, stored before the answer: module and cell routes on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from serving import pipeline
from serving.db import Inspection
from tests.serving.helpers import (
    AUTH,
    BRIGHT,
    DARK,
    MID,
    TINY_THRESHOLD,
    TINY_VERSION,
    cell_image,
    jpeg,
    module_frame,
    png,
    tiff,
)


def levels(rows: int = 6, cols: int = 10, **cells: int) -> np.ndarray:
    grid = np.full((rows, cols), BRIGHT)
    for key, level in cells.items():  # "r0c1": level
        r, c = key[1:].split("c")
        grid[int(r), int(c)] = level
    return grid


def post_module(client: TestClient, body: bytes, serial: str = "M1", frame: str = "f1", **kwargs: Any):
    headers = {
        "Content-Type": str(kwargs.pop("content_type", "image/png")),
        "X-Module-Serial": serial,
        "X-Frame-Id": frame,
    }
    return client.post(
        f"/lines/{kwargs.pop('line', 'L1')}/modules", content=body, headers=headers, params=kwargs
    )


def test_pass_module_is_stored_with_everything_the_issue_lists(client: TestClient) -> None:
    body = png(module_frame(levels()))
    response = post_module(client, body)
    assert response.status_code == 201, response.text
    result = response.json()
    assert result["verdict"] == "PASS"
    assert (result["rows"], result["cols"], len(result["cells"])) == (6, 10, 60)
    assert result["model"] == {
        "name": "pvqc-cell",
        "version": TINY_VERSION,
        "threshold": 0.7,
        "review_threshold": 0.4,
    }
    assert result["frame_sha256"] == hashlib.sha256(body).hexdigest()
    assert {"decode", "geometry", "inference", "store_frame", "total"} <= set(result["timings_ms"])
    first = result["cells"][0]
    assert (first["row"], first["col"], first["verdict"]) == (0, 0, "functional")
    assert len(first["polygon"]) == 4
    stored = client.get(f"/inspections/{result['inspection_id']}").json()
    assert stored["cells"] == result["cells"] and stored["verdict"] == "PASS"
    frame = client.get(result["frame_url"])
    assert frame.status_code == 200 and frame.content == body and frame.headers["content-type"] == "image/png"


def test_dark_cell_fails_the_module_and_is_named(client: TestClient) -> None:
    result = post_module(client, png(module_frame(levels(r2c7=DARK)))).json()
    assert result["verdict"] == "FAIL"
    assert result["defective_cells"] == [[2, 7]]
    assert result["n_defective"] == 1
    cell = next(c for c in result["cells"] if (c["row"], c["col"]) == (2, 7))
    assert cell["probability"] >= TINY_THRESHOLD


def test_uncertain_cell_sends_the_module_to_review(client: TestClient) -> None:
    result = post_module(client, png(module_frame(levels(r5c0=MID)))).json()
    assert result["verdict"] == "REVIEW"
    assert result["n_uncertain"] == 1 and result["defective_cells"] == []


def test_frame_that_is_not_a_module_is_review_never_pass(client: TestClient) -> None:
    blank = np.full((400, 600), 128, np.uint8)
    result = post_module(client, png(blank)).json()
    assert result["verdict"] == "REVIEW"
    assert result["geometry_ok"] is False and result["reason"]
    assert result["cells"] == []
    assert result["modules_in_view"] is None  # refused before any module was located


def test_second_module_in_view_is_named_and_only_the_largest_is_judged(client: TestClient) -> None:
    # a 6x10 module beside a smaller 6x10 one on a dark floor; the smaller one holds a dark cell that
    # must not fail the larger module, and the answer must say another module was in view
    large = module_frame(levels())
    small = module_frame(levels(r0c0=DARK), cell=40, gap=3)
    frame = np.zeros((large.shape[0] + 160, large.shape[1] + small.shape[1] + 240), np.uint8)
    frame[80 : 80 + large.shape[0], 80 : 80 + large.shape[1]] = large
    left = 160 + large.shape[1]
    frame[120 : 120 + small.shape[0], left : left + small.shape[1]] = small
    result = post_module(client, png(frame)).json()
    assert result["verdict"] == "PASS" and len(result["cells"]) == 60
    assert result["modules_in_view"] == 2
    assert result["geometry_notes"] == ["2 modules in view; the largest is judged"]
    assert all(c["polygon"][0][0] < left for c in result["cells"])  # every cell on the large module
    stored = client.get(f"/inspections/{result['inspection_id']}").json()
    assert (stored["modules_in_view"], stored["geometry_notes"]) == (2, result["geometry_notes"])


def test_single_module_has_no_notes_and_a_cell_frame_no_module_count(client: TestClient) -> None:
    frame = np.zeros((6 * 64 + 160, 10 * 64 + 160), np.uint8)
    frame[80:-80, 80:-80] = module_frame(levels())
    module = post_module(client, png(frame)).json()
    assert (module["modules_in_view"], module["geometry_notes"]) == (1, [])
    headers = {"Content-Type": "image/png", "X-Module-Serial": "M3", "X-Frame-Id": "c1"}
    cell = client.post("/lines/L1/cells", content=png(cell_image(BRIGHT)), headers=headers).json()
    assert (cell["modules_in_view"], cell["geometry_notes"]) == (None, [])


def test_repost_of_the_same_frame_returns_the_stored_result_once(client: TestClient) -> None:
    body = png(module_frame(levels(r0c0=DARK)))
    first = post_module(client, body, serial="S9", frame="A")
    again = post_module(client, body, serial="S9", frame="A")
    assert (first.status_code, again.status_code) == (201, 200)
    assert (
        again.json()["inspection_id"] == first.json()["inspection_id"] and again.json()["duplicate"] is True
    )
    other_frame = post_module(client, body, serial="S9", frame="B")
    assert (
        other_frame.status_code == 201
        and other_frame.json()["inspection_id"] != first.json()["inspection_id"]
    )
    page = client.get("/inspections", params={"line_id": "L1"}).json()
    assert len(page["items"]) == 2
    metrics = client.get("/metrics").text
    assert (
        'pvqc_verdicts_total{kind="module",line="L1",model_version="0.0.0-test",verdict="FAIL"} 2.0'
        in metrics
    )


def test_repost_with_another_image_under_the_same_ids_is_refused(client: TestClient) -> None:
    first = post_module(client, png(module_frame(levels())), serial="S7", frame="A")
    reshot = post_module(client, png(module_frame(levels(r2c3=DARK))), serial="S7", frame="A")
    assert (first.status_code, first.json()["verdict"]) == (201, "PASS")
    # the old PASS must not answer for a frame nobody judged
    assert reshot.status_code == 409, reshot.text
    assert "already judged from another image" in reshot.json()["error"]
    assert "new X-Frame-Id" in reshot.json()["error"]
    assert len(client.get("/inspections", params={"line_id": "L1"}).json()["items"]) == 1


def frame_files(client: TestClient) -> set[str]:
    """Names of the files in the frame store (previews aside): temporary ones count too."""
    root = client.app.state.services.frames.root  # type: ignore[attr-defined]
    return {p.name for p in root.rglob("*") if p.is_file() and "previews" not in p.relative_to(root).parts}


def stored_digests(client: TestClient) -> set[str]:
    services = client.app.state.services  # type: ignore[attr-defined]
    with services.sessions() as session:
        return set(session.scalars(select(Inspection.frame_sha256)))


def test_a_losing_twin_with_another_image_leaves_no_frame_file(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = png(module_frame(levels(r1c1=DARK)))  # stored by another module, then posted by a loser
    assert post_module(client, shared, serial="S8", frame="A").status_code == 201
    assert post_module(client, png(module_frame(levels())), serial="S7", frame="A").status_code == 201
    # the race: each loser looked for a stored (line, serial, frame id) before the winner committed,
    # so it decodes, judges and stores its frame, and learns only at its INSERT that it lost
    monkeypatch.setattr(pipeline, "find_existing", lambda *_args: None)
    for body in (png(module_frame(levels(r2c3=DARK))), shared):
        loser = post_module(client, body, serial="S7", frame="A")
        assert loser.status_code == 409, loser.text
        assert "already judged from another image" in loser.json()["error"]
    digests = stored_digests(client)
    assert len(digests) == 2
    # every file on disk is a row's frame: the winner's and the other module's stay, the loser's
    # own frame is gone, and no temporary file is left
    assert frame_files(client) == {f"{digest}.png" for digest in digests}


class NanSession:
    """Stands in for a broken model's InferenceSession: NaN for every cell."""

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        return [np.full(n, np.nan, np.float32), np.zeros((n, 4, 4), np.float32)]


def test_a_model_answering_nan_judges_nothing(client: TestClient) -> None:
    services = client.app.state.services  # type: ignore[attr-defined]
    services.runtime = replace(services.runtime, session=NanSession())
    response = post_module(client, png(module_frame(levels(r1c1=DARK))), serial="NAN")
    assert response.status_code == 500, response.text
    assert "no finite probability for 60 of 60 cell(s)" in response.json()["error"]
    assert client.get("/inspections", params={"line_id": "L1"}).json()["items"] == []
    assert 'pvqc_rejected_requests_total{reason="model_output"} 1.0' in client.get("/metrics").text


def test_grid_comes_from_the_line_or_the_query(client: TestClient) -> None:
    wide = post_module(client, png(module_frame(levels(6, 24))), line="L2").json()
    assert (wide["rows"], wide["cols"], len(wide["cells"])) == (6, 24, 144)
    small = post_module(client, png(module_frame(levels(4, 6), cell=96)), rows=4, cols=6).json()
    assert (small["rows"], small["cols"], small["verdict"]) == (4, 6, "PASS")


@pytest.mark.parametrize(
    ("encode", "content_type", "convert"),
    [
        (png, "image/png", lambda f: f.astype(np.uint16) * 257),  # 16-bit grey
        (tiff, "image/tiff", lambda f: f.astype(np.uint16) * 64),  # 16-bit TIFF, a 10-bit camera's range
        (jpeg, "image/jpeg", lambda f: np.dstack([f, f, f])),  # colour JPEG
        (tiff, "image/tiff", lambda f: f),
    ],
    ids=["png16", "tiff16", "jpeg-colour", "tiff8"],
)
def test_formats_and_bit_depths(client: TestClient, encode, content_type: str, convert) -> None:
    frame = module_frame(levels(r1c1=DARK))
    response = post_module(client, encode(convert(frame)), content_type=content_type)
    assert response.status_code == 201, response.text
    assert response.json()["defective_cells"] == [[1, 1]]


def test_cell_route_judges_one_cell(client: TestClient) -> None:
    headers = {"Content-Type": "image/png", "X-Module-Serial": "M2", "X-Frame-Id": "c1"}
    dark = client.post("/lines/L1/cells", content=png(cell_image(DARK, size=300)), headers=headers).json()
    assert dark["kind"] == "cell" and dark["verdict"] == "FAIL" and len(dark["cells"]) == 1
    assert dark["cells"][0]["probability"] == pytest.approx(1 - DARK / 255, abs=1e-3)
    headers["X-Frame-Id"] = "c2"
    bright = client.post("/lines/L1/cells", content=png(cell_image(BRIGHT, size=20)), headers=headers).json()
    assert bright["verdict"] == "PASS"


def half_cell(top: int, bottom: int, width: int = 128) -> np.ndarray:
    """A half cell (twice as wide as tall) whose part near the top side has brightness `top` and the
    part near the bottom side `bottom`."""
    cell = np.full((width // 2, width), top, np.uint8)
    cell[width // 4 :] = bottom
    return cell


def test_half_cell_is_judged_by_its_better_mirror_not_stretched(client: TestClient) -> None:
    # the tiny model reads a view's centre: mirrored across the bottom side the centre is the bright
    # bottom part, across the top side the dark top part; stretched it would be half of each (REVIEW)
    headers = {"Content-Type": "image/png", "X-Module-Serial": "H1", "X-Frame-Id": "h1"}
    mixed = client.post("/lines/L1/cells", content=png(half_cell(DARK, BRIGHT)), headers=headers).json()
    assert mixed["verdict"] == "PASS"
    assert mixed["cells"][0]["probability"] == pytest.approx(1 - BRIGHT / 255, abs=1e-3)
    headers["X-Frame-Id"] = "h2"  # a defect the whole half shows is seen by both mirrors
    dark = client.post("/lines/L1/cells", content=png(half_cell(DARK, DARK).T.copy()), headers=headers).json()
    assert dark["verdict"] == "FAIL"
    heat = client.get(f"/review/inspections/{mixed['inspection_id']}/cells/0/0/heatmap").json()
    # the heat map sees the pixels the line's verdict came from
    assert heat["views"] == 2
    assert heat["probability"] == pytest.approx(mixed["cells"][0]["probability"], abs=1e-5)


def test_publisher_hears_each_new_inspection_once(make_settings) -> None:
    from serving.app import create_app
    from serving.events import RecordingPublisher

    publisher = RecordingPublisher()
    with TestClient(create_app(make_settings(), publisher=publisher), headers=AUTH) as client:
        body = png(module_frame(levels(r3c3=DARK)))
        first = post_module(client, body, serial="E1").json()
        post_module(client, body, serial="E1")  # a re-post is not a new inspection
    assert [(e.inspection_id, e.line_id, e.verdict.value, e.n_defective) for e in publisher.events] == [
        (first["inspection_id"], "L1", "FAIL", 1)
    ]
