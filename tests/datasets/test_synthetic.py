"""Synthetic module frames: reproducible, and their truth describes the picture."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from datasets.elpv import ElpvCells, load_elpv
from datasets.synthetic import HALF_CUT_GRIDS, FrameSpec, generate_frames, random_spec, render_frame


@pytest.fixture(scope="module")
def cells() -> ElpvCells:
    return load_elpv(indices=np.arange(0, 2624, 25))


def test_same_seed_same_frames(cells: ElpvCells) -> None:
    first = list(generate_frames(cells, 3, seed=9, cell_px=(40.0, 60.0)))
    second = list(generate_frames(cells, 3, seed=9, cell_px=(40.0, 60.0)))
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.image, b.image)
        assert [c.index for c in a.cells] == [c.index for c in b.cells]


def test_truth_is_complete_and_inside_the_frame(cells: ElpvCells) -> None:
    for frame in generate_frames(cells, 6, seed=1, cell_px=(40.0, 70.0), neighbour_probability=0.0):
        assert frame.image.dtype == np.uint8 and frame.image.ndim == 2
        assert len(frame.cells) == frame.rows * frame.cols
        assert [(c.row, c.col) for c in frame.cells] == [
            (r, c) for r in range(frame.rows) for c in range(frame.cols)
        ]
        height, width = frame.image.shape
        for cell in frame.cells:
            assert cell.polygon.shape == (4, 2)
            assert (cell.polygon >= 0).all() and (cell.polygon[:, 0] < width).all()
            assert (cell.polygon[:, 1] < height).all()
            assert cell.name == str(cells.names[cell.index])
            assert cell.probability == float(cells.probabilities[cell.index])


def test_rotation_and_grids_stay_in_range() -> None:
    rng = np.random.default_rng(0)
    specs = [random_spec(rng) for _ in range(200)]
    assert all(abs(spec.rotation_deg) <= 10 for spec in specs)
    assert {(spec.rows, spec.cols) for spec in specs} >= {(6, 10), (10, 6), (6, 12)}
    assert any(spec.neighbour for spec in specs) and any(spec.neighbour is None for spec in specs)


def test_truth_polygon_holds_the_placed_cell(cells: ElpvCells) -> None:
    """Warping each truth polygon back gives the ELPV cell it names (no lighting, no noise)."""
    spec = FrameSpec(rows=3, cols=4, cell_px=150, rotation_deg=7, perspective=0.03, ribbons=False)
    frame = render_frame(cells, spec, np.random.default_rng(3))
    target = np.array([[0, 0], [150, 0], [150, 150], [0, 150]], dtype=np.float32) - 0.5
    for cell in frame.cells:
        warp = cv2.getPerspectiveTransform(cell.polygon, target)
        back = cv2.warpPerspective(frame.image, warp, (150, 150), flags=cv2.INTER_LINEAR)
        original = cv2.resize(cells.images[cell.index], (150, 150), interpolation=cv2.INTER_AREA)
        difference = np.abs(back[5:-5, 5:-5].astype(float) - original[5:-5, 5:-5]).mean()
        assert difference < 6, f"cell {cell.row},{cell.col}: mean difference {difference:.1f}"


def test_neighbour_module_is_cut_off_at_its_edge(cells: ElpvCells) -> None:
    spec = FrameSpec(rows=4, cols=6, cell_px=50, neighbour="right")
    frame = render_frame(cells, spec, np.random.default_rng(4))
    right_strip = frame.image[:, -3:]
    assert right_strip.max() > 60, "expected the neighbour's cells to reach the right edge"
    assert frame.notes and "right" in frame.notes[0]
    assert frame.corners[:, 0].max() < frame.image.shape[1] * 0.9, (
        "expected the main module clear of the edge"
    )


def test_defect_rate_builds_mostly_functional_modules() -> None:
    from datasets.elpv import load_elpv
    from datasets.synthetic import factory_indices

    cells = load_elpv(indices=np.arange(300))
    rng = np.random.default_rng(0)
    modules = [factory_indices(cells, 60, 0.2, rng) for _ in range(200)]
    flawed = [int((cells.probabilities[m] >= 0.5).sum()) for m in modules]
    assert all(n <= 3 for n in flawed)
    assert 0.1 < np.mean([n > 0 for n in flawed]) < 0.3
    assert all(set(cells.probabilities[m]) <= {0.0, 2 / 3, 1.0} for m in modules)


@pytest.mark.parametrize(("rows", "cols", "parts"), [(6, 24, {"left", "right"}), (20, 6, {"top", "bottom"})])
def test_half_cut_module_places_halves_with_a_wider_centre_gap(
    cells: ElpvCells, rows: int, cols: int, parts: set[str]
) -> None:
    spec = FrameSpec(rows=rows, cols=cols, cell_px=80, ribbons=False, half_cut=True)
    frame = render_frame(cells, spec, np.random.default_rng(5))
    assert len(frame.cells) == rows * cols and {cell.part for cell in frame.cells} == parts
    landscape = cols > rows
    first = frame.cells[0].polygon
    size = (first[1, 0] - first[0, 0], first[3, 1] - first[0, 1])
    # halves split across the long axis: narrow on a landscape grid, short on a portrait one
    assert size == ((40, 80) if landscape else (80, 40))
    # along the long axis (no rotation: frame axes), the gaps between consecutive halves
    line = [c for c in frame.cells if (c.row if landscape else c.col) == 0]
    starts = np.array([c.polygon[0, 0 if landscape else 1] for c in line])
    gaps = np.diff(starts) - 40
    centre = len(gaps) // 2
    assert gaps[centre] >= 0.06 * 80 > np.delete(gaps, centre).max()


def test_half_cut_share_mixes_half_cut_modules_in(cells: ElpvCells) -> None:
    frames = list(generate_frames(cells, 12, seed=4, cell_px=(40.0, 60.0), half_cut_share=0.5))
    half_cut = [frame for frame in frames if frame.spec.half_cut]
    assert 0 < len(half_cut) < len(frames)
    assert all((frame.rows, frame.cols) in HALF_CUT_GRIDS for frame in half_cut)
