"""The retraining loop end to end (issue 6's acceptance): a running service judges generated frames,
an engineer reviews some through the API, the reviewed set is exported, a candidate is trained for
one short epoch on ELPV + the reviewed cells, evaluated against the active model, promoted while a
load of concurrent requests runs (none fails, each inspection carries the version that judged it),
and rolled back."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from model.card import read_card, write_card
from model.registry import PARITY_FILE, Registry, RegistryError
from serving.settings import LineConfig, Settings
from tests.serving.conftest import serve_in_thread
from tests.serving.helpers import ADMIN_KEY, AUTH, BRIGHT, DARK, TINY_VERSION, build_tiny_model, png

ROWS, COLS, CELL = 2, 3, 64


def frame(defective: set[tuple[int, int]]) -> np.ndarray:
    """A rectified 2x3 module; a defective cell has a dark centre (its rim stays bright, so the
    module still fills the frame for the geometry)."""
    image = np.zeros((ROWS * CELL, COLS * CELL), np.uint8)
    for r in range(ROWS):
        for c in range(COLS):
            y, x = r * CELL, c * CELL
            image[y + 2 : y + CELL - 2, x + 2 : x + CELL - 2] = BRIGHT
            if (r, c) in defective:
                image[y + CELL // 4 : y + 3 * CELL // 4, x + CELL // 4 : x + 3 * CELL // 4] = DARK
    return image


def tiny_release(folder: Path) -> Path:
    """The tiny test model as a registry version: card fields filled and a parity reference."""
    from model.onnx_export import onnx_probabilities, onnx_session

    build_tiny_model(folder)
    cells = np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8)
    expected = onnx_probabilities(onnx_session(folder / "model.onnx"), cells)
    np.savez(folder / PARITY_FILE, cells=cells, probabilities=expected)
    return folder


def post_module(client: httpx.Client, serial: str, defective: set[tuple[int, int]]) -> dict[str, Any]:
    headers = {"Content-Type": "image/png", "X-Module-Serial": serial, "X-Frame-Id": "1"}
    response = client.post("/lines/L1/modules", content=png(frame(defective)), headers=headers)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def wait_for_version(client: httpx.Client, version: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/models").json()["active"]["version"] == version:
            return
        time.sleep(0.1)
    raise AssertionError(f"the service did not switch to {version} within {timeout} s")


@pytest.mark.slow
def test_review_export_retrain_evaluate_promote_swap_rollback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from serving.db import make_engine
    from serving.export_reviewed import MANIFEST_FILE, export_reviewed
    from serving.store import FrameStore
    from training import models
    from training.config import TrainConfig
    from training.export import main as export_release
    from training.models import Rule, compare
    from training.train import main as train

    registry = Registry(tmp_path / "models" / "pvqc-cell")
    base = tiny_release(registry.root / TINY_VERSION)

    # a card lacking fields is refused, with the fields named; so is an ONNX that fails parity
    with pytest.raises(RegistryError, match=r"lacks the field\(s\) \['provenance', 'metrics'\]"):
        registry.promote(TINY_VERSION)
    card = read_card(base)
    card.provenance = {"training_data": "none: a test model"}
    card.metrics = {"note": "test model"}
    write_card(card, base)
    with np.load(base / PARITY_FILE) as data:
        good = {name: data[name] for name in ("cells", "probabilities")}
    np.savez(base / PARITY_FILE, cells=good["cells"], probabilities=good["probabilities"] + 0.01)
    with pytest.raises(RegistryError, match="ONNX parity failed"):
        registry.promote(TINY_VERSION)
    np.savez(base / PARITY_FILE, cells=good["cells"], probabilities=good["probabilities"])
    registry.promote(TINY_VERSION)

    settings = Settings(
        model_dir=tmp_path / "no-such-model",  # the registry's active version is what serves
        model_registry=registry.root,
        registry_poll_seconds=0.2,
        ort_threads=1,  # 2 cores shared with training in this test: no thread oversubscription
        var_dir=tmp_path / "var",
        lines={"L1": LineConfig(rows=ROWS, cols=COLS)},
        max_wait_ms=2.0,
        bootstrap_admin_key=ADMIN_KEY,
    )
    with (
        serve_in_thread(settings) as address,
        httpx.Client(base_url=f"http://{address}", headers=AUTH) as admin,
    ):
        key = admin.post("/keys", json={"name": "eng-anna", "role": "engineer"}).json()["key"]
        engineer = httpx.Client(base_url=f"http://{address}", headers={"Authorization": f"Bearer {key}"})

        # the line posts modules; the engineer reviews each, cell by cell where a cell is defective
        rng = np.random.default_rng(1)
        truth: dict[int, set[tuple[int, int]]] = {}
        for i in range(14):
            defective = {
                (int(r), int(c)) for r, c in rng.integers(0, (ROWS, COLS), (int(rng.integers(0, 3)), 2))
            }
            result = post_module(admin, f"M{i:03d}", defective)
            assert result["model"]["version"] == TINY_VERSION
            truth[result["inspection_id"]] = defective
        for inspection_id, defective in truth.items():
            body = {
                "module": "FAIL" if defective else "PASS",
                "cells": [
                    {"row": r, "col": c, "label": "defective", "defect_type": "crack"} for r, c in defective
                ],
            }
            response = engineer.post(f"/review/inspections/{inspection_id}/decisions", json=body)
            assert response.status_code == 201, response.text

        # export: every reviewed cell, labelled by the engineer; a second run cuts nothing again
        engine = make_engine(settings.resolved_database_url)
        from sqlalchemy.orm import sessionmaker

        sessions = sessionmaker(engine, expire_on_commit=False)
        reviewed = tmp_path / "reviewed"
        first = export_reviewed(sessions, FrameStore(settings.resolved_frames_dir), reviewed, cell_size=300)
        manifest = (reviewed / MANIFEST_FILE).read_bytes()
        again = export_reviewed(sessions, FrameStore(settings.resolved_frames_dir), reviewed, cell_size=300)
        engine.dispose()
        assert first.cells == 14 * ROWS * COLS and first.new == first.cells
        assert again.new == 0 and again.reused == first.cells
        assert (reviewed / MANIFEST_FILE).read_bytes() == manifest  # reproducible
        records = [json.loads(line) for line in manifest.decode().splitlines()]
        assert sum(r["label"] == "defective" for r in records) == sum(len(d) for d in truth.values())
        assert {r["reviewer"] for r in records} == {"eng-anna"}

        # retrain one short epoch on ELPV + the reviewed cells, export as a registry version
        run = tmp_path / "run"
        train(
            TrainConfig(
                epochs=1,
                batch_size=16,
                limit_train=16,
                limit_validation=8,
                freeze_blocks=5,
                cache_frozen=True,
                reviewed_sets=[str(reviewed)],
                reviewed_weights=[2.0],
                threads=1,
                out_dir=str(run),
            )
        )
        candidate = "1.1.0-retrained"
        export_release(run / "best.pt", registry.root / candidate, candidate, False, False, 16)

        # evaluate against the active model on held-out ELPV and reviewed test modules
        # 16 ELPV test cells keep the test fast; `--limit` would make it a quick look that records nothing
        whole_sets = models.held_out_sets
        monkeypatch.setattr(models, "held_out_sets", lambda sets, limit: whole_sets(sets, 16))
        report = compare(
            registry, candidate, [reviewed], Rule(max_escape_increase=1.0, min_reviewed_gain=-1.0)
        )
        assert report["against"] == TINY_VERSION and report["promote"], report["reason"]
        assert "reviewed_test" in report["sets"] or "elpv_test" in report["sets"]
        assert (registry.root / candidate / "evaluation" / "report.md").is_file()

        # promote under load: no request fails, every inspection names one of the two versions
        seen: list[tuple[float, int, str]] = []
        stop = threading.Event()

        def load(worker: int) -> None:
            with httpx.Client(base_url=f"http://{address}", headers=AUTH, timeout=60) as client:
                n = 0
                while not stop.is_set():
                    headers = {
                        "Content-Type": "image/png",
                        "X-Module-Serial": f"L{worker}-{n}",
                        "X-Frame-Id": "1",
                    }
                    response = client.post("/lines/L1/modules", content=png(frame({(0, 1)})), headers=headers)
                    version = response.json()["model"]["version"] if response.status_code == 201 else ""
                    seen.append((time.monotonic(), response.status_code, version))
                    n += 1

        workers = [threading.Thread(target=load, args=(w,)) for w in range(3)]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        registry.promote(candidate)
        promoted_at = time.monotonic()
        wait_for_version(admin, read_card(registry.root / candidate).version)
        time.sleep(1.0)
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
        assert seen and all(status == 201 for _, status, _ in seen), {s for _, s, _ in seen}
        assert {v for _, _, v in seen} <= {TINY_VERSION, candidate}
        assert any(v == TINY_VERSION for t, _, v in seen if t < promoted_at)
        assert seen[-1][2] == candidate
        assert post_module(admin, "after-promote", set())["model"]["version"] == candidate

        # roll back: the previous version serves again
        assert registry.rollback() == TINY_VERSION
        admin.post("/models/reload")
        wait_for_version(admin, TINY_VERSION)
        assert post_module(admin, "after-rollback", set())["model"]["version"] == TINY_VERSION
        engineer.close()
