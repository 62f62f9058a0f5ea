"""The service on the real classifier: same probabilities as onnxruntime alone, verdicts by its card.

Uses the shipped model (model.card.SHIPPED_MODEL_DIR) or, before it is committed, the development
export under var/dev-model; skips when neither is on disk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from model.card import read_card
from serving.app import create_app
from serving.settings import DEFAULT_MODEL_DIR, LineConfig, Settings
from tests.serving.helpers import ADMIN_KEY, AUTH, module_frame, png

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = [DEFAULT_MODEL_DIR, ROOT / "var" / "dev-model"]


@pytest.fixture(scope="module")
def real_model() -> Path:
    for folder in CANDIDATES:
        if (folder / "card.json").is_file():
            return folder
    pytest.skip(f"no real model on disk (looked in {', '.join(str(c) for c in CANDIDATES)})")


@pytest.fixture
def real_client(real_model: Path, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_dir=real_model,
        var_dir=tmp_path,
        lines={"L1": LineConfig(rows=2, cols=3)},
        bootstrap_admin_key=SecretStr(ADMIN_KEY),
    )
    with TestClient(create_app(settings), headers=AUTH) as client:
        yield client


@pytest.mark.slow
def test_real_model_cell_and_module(real_model: Path, real_client: TestClient) -> None:
    card = read_card(real_model)
    size = card.input.size
    rng = np.random.default_rng(0)
    # textured cells: a smooth gradient plus noise, a dark crack-like line in one of them
    cells = np.clip(rng.normal(150, 20, (6, size, size)), 0, 255).astype(np.uint8)
    cells[4, size // 2 - 3 : size // 2 + 3, :] = 10
    session = ort.InferenceSession(str(card.onnx_path(real_model)), providers=["CPUExecutionProvider"])
    expected = session.run(["probability"], {"image": cells[:1].astype(np.float32)[:, None]})[0]

    headers = {"Content-Type": "image/png", "X-Module-Serial": "real", "X-Frame-Id": "cell"}
    cell = real_client.post("/lines/L1/cells", content=png(cells[0]), headers=headers).json()
    assert cell["cells"][0]["probability"] == pytest.approx(float(expected[0]), abs=1e-4)
    assert cell["model"]["version"] == card.version
    assert cell["cells"][0]["verdict"] == card.operating_points.judge(float(expected[0])).value

    levels = np.zeros((2, 3))  # module_frame paints levels; paste the textured cells over it instead
    frame = module_frame(levels, cell=size, gap=0)
    for index in range(6):
        r, c = divmod(index, 3)
        frame[r * size : (r + 1) * size, c * size : (c + 1) * size] = cells[index]
    headers["X-Frame-Id"] = "module"
    module = real_client.post("/lines/L1/modules", content=png(frame), headers=headers).json()
    assert module["model"]["threshold"] == card.operating_points.threshold
    if module["geometry_ok"]:
        judged = [card.operating_points.judge(c["probability"]).value for c in module["cells"]]
        assert [c["verdict"] for c in module["cells"]] == judged and len(judged) == 6
    else:
        assert module["verdict"] == "REVIEW"
