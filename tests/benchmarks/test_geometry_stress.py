"""The geometry stress benchmark's frames: a dark edge where it says, and each frame's outcome."""

from __future__ import annotations

import numpy as np
import pytest

import benchmarks.geometry_stress as stress
from benchmarks.geometry_stress import layout, outcome, stress_spec
from datasets.elpv import load_elpv
from datasets.synthetic import FrameSpec, SyntheticFrame, render_frame
from model.geometry import CellCut, ModuleGeometry


def test_a_dark_edge_is_one_whole_edge_row_or_column_of_dark_cells() -> None:
    dark = np.arange(100, 110)
    for seed in range(12):
        rng = np.random.default_rng(seed)
        spec = stress_spec(rng, half_cut_share=0.0)
        grid = layout(rng, spec, 100, dark, dark_edge=True).reshape(spec.rows, spec.cols)
        edges = [grid[0], grid[-1], grid[:, 0], grid[:, -1]]
        assert sum(bool(np.isin(edge, dark).all()) for edge in edges) == 1
        assert np.isin(grid, dark).sum() == len(next(e for e in edges if np.isin(e, dark).all()))
        plain = layout(rng, spec, 100, dark, dark_edge=False)
        assert not np.isin(plain, dark).any()


def test_stress_specs_go_past_the_generators_ranges() -> None:
    rng = np.random.default_rng(0)
    specs = [stress_spec(rng, half_cut_share=0.0) for _ in range(300)]
    assert max(abs(s.rotation_deg) for s in specs) > 10 and max(s.noise_sigma for s in specs) > 6
    assert min(s.gain for s in specs) < 0.9 and max(s.vignetting for s in specs) > 0.2


def test_outcome_of_a_plain_frame_is_right_and_of_a_blank_one_refused() -> None:
    cells = load_elpv(indices=np.arange(0, 2624, 40))
    rng = np.random.default_rng(1)
    frame = render_frame(cells, FrameSpec(rows=6, cols=10, cell_px=90), rng)
    kind, worst = outcome(frame, cells)
    assert kind == "right" and worst <= 0.03
    blank = type(frame)(np.zeros_like(frame.image), 6, 10, frame.corners, frame.cells, frame.spec)
    assert outcome(blank, cells) == ("refused", float("inf"))


def shifted_geometry(frame: SyntheticFrame, down: float) -> ModuleGeometry:
    """The frame's true cells, each moved by `down` of its own height along its left side."""
    cells = []
    for truth in frame.cells:
        shift = down * (truth.polygon[3] - truth.polygon[0])
        cells.append(CellCut(truth.row, truth.col, np.zeros((1, 4, 4), np.uint8), truth.polygon + shift))
    return ModuleGeometry(True, None, 0.9, frame.rows, frame.cols, frame.corners, cells)


@pytest.mark.parametrize(("down", "kind"), [(0.01, "right"), (0.05, "off"), (0.2, "wrong")])
@pytest.mark.parametrize("half_cut", [False, True])
def test_outcome_measures_each_cell_in_its_own_sides(
    monkeypatch: pytest.MonkeyPatch, down: float, kind: str, half_cut: bool
) -> None:
    # a portrait half-cut module's cells are wide and short: an error along the short side is what
    # cuts them wrong, and must not be diluted by measuring it in cell widths
    cells = load_elpv(indices=np.arange(0, 2624, 40))
    spec = FrameSpec(rows=20 if half_cut else 10, cols=6, cell_px=90, half_cut=half_cut)
    frame = render_frame(cells, spec, np.random.default_rng(2))
    monkeypatch.setattr(stress, "cut_module", lambda *_: shifted_geometry(frame, down))
    got, worst = outcome(frame, cells)
    assert got == kind and worst == pytest.approx(down, abs=1e-4)


@pytest.mark.parametrize(
    ("grid", "whole"), [((6, 20), (6, 10)), ((6, 24), (6, 12)), ((20, 6), (10, 6)), ((24, 6), (12, 6))]
)
def test_a_half_cut_module_read_as_whole_cells_pairs_its_halves_along_the_long_side(
    grid: tuple[int, int], whole: tuple[int, int]
) -> None:
    spec = FrameSpec(rows=grid[0], cols=grid[1], cell_px=100, half_cut=True)
    assert stress.whole_cell_grid(spec) == whole
