"""The geometry stress benchmark's frames: a dark edge where it says, and each frame's outcome."""

from __future__ import annotations

import numpy as np

from benchmarks.geometry_stress import layout, outcome, stress_spec
from datasets.elpv import load_elpv
from datasets.synthetic import FrameSpec, render_frame


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
