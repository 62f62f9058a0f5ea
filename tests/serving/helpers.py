"""Test material for the service: a tiny ONNX model with the real contract, and generated frames.

The tiny model keeps the suite fast on 2 cores: input `image` (N, 1, 32, 32) float32 grey levels,
outputs `probability` (N,) = 1 - mean(centre 16x16) / 255 (a dark cell is a defective cell, as in EL)
and `cam` (N, 4, 4). Cells are generated with a known brightness, so tests know each verdict ahead.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np

from model.card import InputSpec, ModelCard, OperatingPoints, TensorSpec, write_card
from serving.db import MIGRATIONS_DIR, Inspection, make_engine, utcnow
from serving.store import sha256_hex

TINY_SIZE = 32
TINY_VERSION = "0.0.0-test"
TINY_THRESHOLD = 0.7  # defective at p >= 0.7, i.e. a centre darker than 76
TINY_REVIEW = 0.4  # uncertain at 0.4 <= p < 0.7, i.e. a centre between 77 and 153
BRIGHT, MID, DARK = 220, 110, 20  # functional, uncertain, defective centres
ADMIN_KEY = "pvqc_test-admin-key-not-secret"  # PVQC_BOOTSTRAP_ADMIN_KEY of every test service
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def build_tiny_model(folder: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    s = TINY_SIZE
    nodes = [
        # centre crop: what the cell shows, not the gaps that geometry may leave at its border
        helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["centre"]),
        helper.make_node("ReduceMean", ["centre"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Div", ["mean", "full"], ["bright"]),
        helper.make_node("Sub", ["one", "bright"], ["probability"]),
        helper.make_node("AveragePool", ["image"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Squeeze", ["pooled", "channel"], ["cam"]),
    ]
    initialisers = [
        helper.make_tensor("starts", TensorProto.INT64, [2], [s // 4, s // 4]),
        helper.make_tensor("ends", TensorProto.INT64, [2], [3 * s // 4, 3 * s // 4]),
        helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3]),
        helper.make_tensor("full", TensorProto.FLOAT, [], [255.0]),
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("channel", TensorProto.INT64, [1], [1]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny-cell",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, s, s])],
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch"]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["batch", s // 8, s // 8]),
        ],
        initialisers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    card = ModelCard(
        name="pvqc-cell",
        version=TINY_VERSION,
        architecture="tiny-test",
        input=InputSpec(
            tensor=TensorSpec(name="image", shape=["batch", 1, s, s], datatype="FP32"), size=s, colour="grey"
        ),
        outputs=[
            TensorSpec(name="probability", shape=["batch"], datatype="FP32"),
            TensorSpec(name="cam", shape=["batch", s // 8, s // 8], datatype="FP32"),
        ],
        classes={"probability": "1 - centre brightness (test model)"},
        operating_points=OperatingPoints(
            threshold=TINY_THRESHOLD, review_threshold=TINY_REVIEW, threshold_rule="test", review_rule="test"
        ),
        files={"fp32": "model.onnx"},
    )
    write_card(card, folder)
    return folder


def cell_image(level: int, size: int = 64) -> np.ndarray:
    """A cell of uniform brightness `level` with a slightly darker rim (busbars-free, test only)."""
    cell = np.full((size, size), level, np.uint8)
    return cell


def module_frame(levels: np.ndarray, cell: int = 64, gap: int = 4) -> np.ndarray:
    """A rectified module filling the frame: rows x cols cells at `levels`, dark gaps between them."""
    rows, cols = levels.shape
    frame = np.zeros((rows * cell, cols * cell), np.uint8)
    for r in range(rows):
        for c in range(cols):
            frame[
                r * cell + gap // 2 : (r + 1) * cell - gap // 2,
                c * cell + gap // 2 : (c + 1) * cell - gap // 2,
            ] = levels[r, c]
    return frame


def png(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", image)
    assert ok
    return data.tobytes()


def jpeg(image: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return data.tobytes()


def tiff(image: np.ndarray, **options: object) -> bytes:
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, **options)  # type: ignore[arg-type]
    return buffer.getvalue()


def inspection_row(
    serial: str, data: bytes, verdict: str = "PASS", created_at: datetime | None = None
) -> Inspection:
    """A module inspection of frame "1" on line L1 whose frame is `data`, for tests of the store itself."""
    return Inspection(
        line_id="L1",
        serial=serial,
        frame_id="1",
        kind="module",
        verdict=verdict,
        rows=6,
        cols=10,
        n_defective=0,
        n_uncertain=0,
        model_name="pvqc-cell",
        model_version="0.0.0-test",
        threshold=0.7,
        review_threshold=0.4,
        frame_sha256=sha256_hex(data),
        frame_content_type="image/png",
        frame_width=1,
        frame_height=1,
        geometry_ok=True,
        timings_ms={},
        created_at=created_at or utcnow(),
        cells=[],
    )


def downgrade(url: str, revision: str) -> None:
    """Take the database at `url` down to an earlier schema revision (Alembic), as an operator would."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = make_engine(url)  # foreign keys on, as the service runs SQLite
    try:
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.downgrade(config, revision)
    finally:
        engine.dispose()
