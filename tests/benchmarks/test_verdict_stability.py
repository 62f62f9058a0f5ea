"""The verdict-stability benchmark's own arithmetic: which way verdicts flip, and the camera copies."""

from __future__ import annotations

import numpy as np

from benchmarks.verdict_stability import camera_copies, steadiness


def test_steadiness_counts_flips_each_way_at_the_threshold() -> None:
    uncut = np.array([0.1, 0.49, 0.51, 0.9, 0.6])
    moved = np.array([0.2, 0.55, 0.45, 0.95, 0.6])
    result = steadiness(uncut, moved, threshold=0.5)
    assert result["flips_to_defective"] == 1 and result["flips_to_functional"] == 1
    assert result["agreement"] == 0.6
    assert result["mean_abs_change"] == round(float(np.abs(moved - uncut).mean()), 4)


def test_camera_copies_are_reproducible_grey_cells_that_differ_from_the_originals() -> None:
    cells = np.full((6, 20, 20), 150, dtype=np.uint8)
    first, again = camera_copies(cells, seed=3), camera_copies(cells, seed=3)
    assert first.dtype == np.uint8 and first.shape == cells.shape
    assert np.array_equal(first, again)
    means = first.reshape(6, -1).mean(axis=1)
    # a gain of 0.9-1.08 on 150, give or take the noise's mean over 400 pixels
    assert np.all((means > 150 * 0.9 - 2) & (means < 150 * 1.08 + 2)) and not np.array_equal(first, cells)
