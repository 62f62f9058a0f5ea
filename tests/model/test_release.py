"""The released model committed under models/: complete card, intact files, INT8 tracking FP32."""

from __future__ import annotations

import hashlib

import numpy as np

from datasets.elpv import elpv_root, load_elpv, read_labels, split_indices
from model.card import SHIPPED_MODEL_DIR, read_card
from model.onnx_export import onnx_probabilities, onnx_session

RELEASE = SHIPPED_MODEL_DIR


def test_card_is_complete_and_files_are_intact() -> None:
    card = read_card(RELEASE)
    for variant in ("fp32", "int8"):
        path = card.onnx_path(RELEASE, variant)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == card.provenance["sha256"][path.name]
    assert {"fp32", "int8"} <= set(card.metrics["test"])
    for key in ("accuracy", "f1_defective", "roc_auc", "recall_at_5pct_false_reject", "grade4_accuracy"):
        assert 0 < card.metrics["test"]["fp32"][key] <= 1, key
    assert "CC BY-NC-SA 4.0" in card.licence
    total = sum(p.stat().st_size for p in RELEASE.rglob("*") if p.is_file())
    assert total < 20e6, f"release is {total / 1e6:.1f} MB"


def test_int8_agrees_with_fp32_on_validation_cells() -> None:
    card = read_card(RELEASE)
    _, probabilities, types = read_labels(elpv_root() / "labels.csv")
    _, validation, _ = split_indices(probabilities, types)
    cells = load_elpv(indices=validation[:48]).images
    fp32 = onnx_probabilities(onnx_session(card.onnx_path(RELEASE, "fp32")), cells)
    int8 = onnx_probabilities(onnx_session(card.onnx_path(RELEASE, "int8")), cells)
    threshold = card.operating_points.threshold
    assert np.mean((fp32 >= threshold) == (int8 >= threshold)) >= 0.95
    # on any x86 CPU: 1.2.0's 8-bit weights drifted by 0.07 on average on one without VNNI; 1.2.1
    # (stem in float) read 0.023 on these cells, 1.2.2 (first block in float too) 0.012
    assert float(np.mean(np.abs(fp32 - int8))) <= 0.02
