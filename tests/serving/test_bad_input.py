"""Bad input: each gets a 4xx with a JSON `error` naming the problem, nothing is stored, and the
service keeps serving (a good frame right after is judged)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from serving.app import create_app
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, BRIGHT, module_frame, png, tiff

GOOD = png(module_frame(np.full((6, 10), BRIGHT)))


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking PNG header announcing width x height (a decompression bomb's first bytes)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + b"\0" * 64
    )


CASES: dict[str, tuple[bytes, str, dict[str, Any], int, str]] = {
    "empty body": (b"", "image/png", {}, 400, "empty"),
    "truncated png": (GOOD[: len(GOOD) // 2], "image/png", {}, 400, "truncated"),
    "corrupt bytes": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, "image/png", {}, 400, "IHDR"),
    "wrong content type": (GOOD, "text/plain", {}, 415, "Content-Type"),
    "bytes not matching type": (GOOD, "image/jpeg", {}, 415, "not a image/jpeg"),
    "decompression bomb": (png_claiming(100_000, 100_000), "image/png", {}, 413, "pixels"),
    "two channels": (
        tiff(np.zeros((60, 60, 2), np.uint8), photometric="minisblack", planarconfig="contig"),
        "image/tiff",
        {},
        422,
        "channels",
    ),
    "signed 8-bit pixels": (tiff(np.zeros((60, 60), np.int8)), "image/tiff", {}, 422, "8- or 16-bit"),
    "grid of zero": (GOOD, "image/png", {"rows": 0}, 400, "grid"),
    # nothing to check a single row or column against: noise passed as a 1x1 "module"
    "one-cell grid": (GOOD, "image/png", {"rows": 1, "cols": 1}, 400, "rows, cols >= 2"),
    "one-row grid": (GOOD, "image/png", {"rows": 1}, 400, "/lines/L1/cells"),
    "absurd grid": (GOOD, "image/png", {"rows": 500, "cols": 500}, 400, "grid"),
    "grid not a number": (GOOD, "image/png", {"rows": "six"}, 422, "rows"),
}


@pytest.fixture
def small_limits(make_settings: MakeSettings) -> Iterator[TestClient]:
    settings = make_settings(max_body_bytes=100_000, max_pixels=10_000_000)
    with TestClient(create_app(settings), headers=AUTH) as test_client:
        yield test_client


def assert_nothing_stored_and_still_serving(client: TestClient) -> None:
    assert client.get("/inspections").json()["items"] == []
    good = client.post(
        "/lines/L1/modules",
        content=GOOD,
        headers={"Content-Type": "image/png", "X-Module-Serial": "ok", "X-Frame-Id": "ok"},
    )
    assert good.status_code == 201 and good.json()["verdict"] == "PASS"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_frame_is_refused_with_a_reason(small_limits: TestClient, case: str) -> None:
    body, content_type, params, status, words = CASES[case]
    headers = {"Content-Type": content_type, "X-Module-Serial": "bad", "X-Frame-Id": case}
    response = small_limits.post("/lines/L1/modules", content=body, headers=headers, params=params)
    assert response.status_code == status, response.text
    assert words.lower() in response.json()["error"].lower()
    assert_nothing_stored_and_still_serving(small_limits)


def test_body_over_the_size_limit(small_limits: TestClient) -> None:
    headers = {"Content-Type": "image/png", "X-Module-Serial": "big", "X-Frame-Id": "1"}
    response = small_limits.post("/lines/L1/modules", content=GOOD + b"\0" * 100_000, headers=headers)
    assert response.status_code == 413 and "limit" in response.json()["error"]
    assert_nothing_stored_and_still_serving(small_limits)


def test_unknown_line_is_404_json(small_limits: TestClient) -> None:
    headers = {"Content-Type": "image/png", "X-Module-Serial": "x", "X-Frame-Id": "1"}
    response = small_limits.post("/lines/nowhere/modules", content=GOOD, headers=headers)
    assert response.status_code == 404 and "unknown line 'nowhere'" in response.json()["error"]
    assert small_limits.get("/lines/nowhere/stats").status_code == 404
    assert_nothing_stored_and_still_serving(small_limits)


@pytest.mark.parametrize("missing", ["X-Module-Serial", "X-Frame-Id"])
def test_identity_headers_are_required(small_limits: TestClient, missing: str) -> None:
    headers = {"Content-Type": "image/png", "X-Module-Serial": "x", "X-Frame-Id": "1"}
    del headers[missing]
    response = small_limits.post("/lines/L1/cells", content=GOOD, headers=headers)
    assert response.status_code == 400 and missing in response.json()["error"]
    assert_nothing_stored_and_still_serving(small_limits)


def test_unknown_inspection_is_404_json(small_limits: TestClient) -> None:
    response = small_limits.get("/inspections/12345")
    assert response.status_code == 404 and "12345" in response.json()["error"]
