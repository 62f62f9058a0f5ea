"""The line simulator posts PNG frames to the module route with the right headers and grid."""

from __future__ import annotations

import ast
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

import datasets.line_simulator as simulator
from datasets.elpv import load_elpv


def test_posts_frames_to_the_module_route() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"verdict": "PASS"})

    args = simulator.parse_args(
        [
            "--url",
            "http://pvqc.test/",
            "--line",
            "L7",
            "--rate",
            "200",
            "--count",
            "3",
            "--rows",
            "4",
            "--cols",
            "6",
            "--cell-px",
            "40",
            "--api-key",
            "secret",
        ]
    )
    cells = load_elpv(indices=np.arange(40))
    outcomes = simulator.run(args, cells, client=httpx.Client(transport=httpx.MockTransport(answer)))
    assert outcomes == {"PASS": 3}
    assert len(seen) == 3
    for request in seen:
        assert request.method == "POST"
        assert request.url.path == "/lines/L7/modules"
        assert dict(request.url.params) == {"rows": "4", "cols": "6"}
        assert request.headers["content-type"] == "image/png"
        assert request.headers["x-module-serial"].startswith("SIM-L7-")
        assert request.headers["x-frame-id"]
        assert request.headers["x-api-key"] == "secret"
        image = cv2.imdecode(np.frombuffer(request.content, np.uint8), cv2.IMREAD_UNCHANGED)
        assert image is not None and image.ndim == 2 and image.dtype == np.uint8
    assert len({r.headers["x-module-serial"] for r in seen}) == 3
    assert len({r.headers["x-frame-id"] for r in seen}) == 3


def test_half_cut_line_gets_half_cut_modules_it_can_cut() -> None:
    from model.geometry import cut_module

    bodies: list[bytes] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        return httpx.Response(200, json={"verdict": "PASS"})

    argv = ["--rate", "500", "--count", "2", "--rows", "6", "--cols", "24", "--cell-px", "120", "--half-cut"]
    cells = load_elpv(indices=np.arange(40))
    client = httpx.Client(transport=httpx.MockTransport(answer))
    assert simulator.run(simulator.parse_args(argv), cells, client=client) == {"PASS": 2}
    for body in bodies:
        image = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_GRAYSCALE)
        # 24 half cells of 60 px across, 6 whole-height ones down: wider than tall by about 2:1
        assert 1.5 < image.shape[1] / image.shape[0] < 3.2
        geometry = cut_module(image, 6, 24, 64)
        assert geometry.ok and len(geometry.cells) == 144, geometry.reason


def test_unreachable_service_is_counted_not_raised() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    args = simulator.parse_args(
        ["--rate", "500", "--count", "2", "--rows", "2", "--cols", "3", "--cell-px", "30"]
    )
    cells = load_elpv(indices=np.arange(10))
    outcomes = simulator.run(args, cells, client=httpx.Client(transport=httpx.MockTransport(refuse)))
    assert outcomes == {"error": 2}


def test_no_frame_starts_after_the_duration_even_when_answers_are_slow(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]  # a fake clock: each answer takes 1 s, the schedule asks for 10 frames a second
    monkeypatch.setattr(simulator.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(simulator.time, "sleep", lambda seconds: clock.__setitem__(0, clock[0] + seconds))

    def slow(request: httpx.Request) -> httpx.Response:
        clock[0] += 1.0
        return httpx.Response(200, json={"verdict": "PASS"})

    args = simulator.parse_args(
        ["--rate", "10", "--duration", "3", "--rows", "2", "--cols", "3", "--cell-px", "30"]
    )
    cells = load_elpv(indices=np.arange(10))
    outcomes = simulator.run(args, cells, client=httpx.Client(transport=httpx.MockTransport(slow)))
    assert outcomes == {"PASS": 3} and clock[0] == pytest.approx(3.0)  # it used to send all 30 due frames


def test_answers_that_are_not_verdicts_are_counted_by_status() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if len(seen) == 1:  # a proxy's error page that claims to be JSON
            return httpx.Response(
                502, text="<html>bad gateway</html>", headers={"content-type": "application/json"}
            )
        return httpx.Response(401, json={"detail": "expected an X-API-Key header"})

    args = simulator.parse_args(
        ["--rate", "500", "--count", "3", "--rows", "2", "--cols", "3", "--cell-px", "30"]
    )
    cells = load_elpv(indices=np.arange(10))
    outcomes = simulator.run(args, cells, client=httpx.Client(transport=httpx.MockTransport(answer)))
    assert outcomes == {"502": 1, "401": 2}


@pytest.mark.parametrize(
    "argv",
    [
        ["--rate", "0"],
        ["--rate", "nan"],
        ["--rate", "inf"],
        ["--rows", "0"],
        ["--count", "3", "--duration", "2"],
        ["--count", "-3"],
        ["--duration", "-5"],
        ["--defect-rate", "7"],
        ["--timeout", "-1"],
    ],
)
def test_bad_arguments_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        simulator.parse_args(argv)


def test_does_not_import_the_service() -> None:
    tree = ast.parse(Path(simulator.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not any(name.split(".")[0] in {"serving", "training"} for name in modules)


def test_missing_elpv_data_ends_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PVQC_ELPV_ROOT", str(tmp_path / "nowhere"))
    assert simulator.cli(["--count", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: expected ELPV labels at") and "\n" not in err
