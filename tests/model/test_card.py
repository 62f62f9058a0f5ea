"""The model card: operating points judge cells, and a broken card says which field is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model.card import CardError, CellVerdict, OperatingPoints, read_card


def points() -> OperatingPoints:
    return OperatingPoints(threshold=0.6, review_threshold=0.2, threshold_rule="t", review_rule="r")


@pytest.mark.parametrize(
    ("probability", "verdict"),
    [
        (0.0, CellVerdict.FUNCTIONAL),
        (0.19, CellVerdict.FUNCTIONAL),
        (0.2, CellVerdict.UNCERTAIN),
        (0.6, CellVerdict.DEFECTIVE),
        (float("nan"), CellVerdict.UNCERTAIN),  # compares false with every threshold: never functional
        (float("inf"), CellVerdict.UNCERTAIN),
    ],
)
def test_operating_points_judge_cells(probability: float, verdict: CellVerdict) -> None:
    assert points().judge(probability) is verdict


def test_review_threshold_above_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="review_threshold <= threshold"):
        OperatingPoints(threshold=0.3, review_threshold=0.5, threshold_rule="t", review_rule="r")


def test_missing_card_and_missing_fields_are_named(tmp_path: Path) -> None:
    with pytest.raises(CardError, match="expected a model card"):
        read_card(tmp_path)
    (tmp_path / "card.json").write_text(json.dumps({"name": "pvqc-cell", "version": "1"}))
    with pytest.raises(CardError, match="operating_points"):
        read_card(tmp_path)
