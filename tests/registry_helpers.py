"""Registry versions made of the tiny test model: a complete card and a parity reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from model.card import read_card, write_card
from model.registry import PARITY_FILE
from tests.serving.helpers import build_tiny_model


def tiny_version(folder: Path, version: str, threshold: float = 0.7, review: float = 0.4) -> Path:
    """The tiny model as registry version `version`, promotable: card filled, parity.npz written."""
    from model.onnx_export import onnx_probabilities, onnx_session

    build_tiny_model(folder)
    card = read_card(folder)
    card.version = version
    card.operating_points.threshold = threshold
    card.operating_points.review_threshold = review
    card.provenance = {"training_data": "none: a test model"}
    card.metrics = {"note": "test model"}
    write_card(card, folder)
    cells = np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8)
    np.savez(
        folder / PARITY_FILE,
        cells=cells,
        probabilities=onnx_probabilities(onnx_session(folder / "model.onnx"), cells),
    )
    return folder
