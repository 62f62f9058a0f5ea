"""Geometry beyond the generator's ranges: how often a wrong grid is passed off as right; one JSON line.

Owns: the count that matters most for a line's safety, the frames where `cut_module` says ok but cuts
cells in the wrong place (a classifier then judges half a cell and a gap, and a module can PASS on
cells nobody looked at). A refusal is safe: serving answers REVIEW with the reason. The frames go past
what `datasets.synthetic.random_spec` draws (tilt up to 14 degrees, perspective up to 0.07, vignetting
up to 0.35, gain 0.7-1.1, noise up to 12 grey levels, 70-200 px cells), and `--dark-edge-share` of
them have a whole edge row or column of the darkest ELPV cells: an inactive string at the module's
edge, which the module's outline does not enclose. Each frame is one of:
- right: every cell centre within 3 % of the truth;
- refused: ok=False, with a reason (REVIEW in serving);
- off: ok, the worst centre 3-10 % off;
- wrong: ok, a cell centre more than 10 % off (a silent wrong cut).
Each half-cut frame is also cut as a line configured for whole cells would (`whole_cell_grid`: half the
cells along the module's long side): every such grid is wrong, and `half_cut_read_as_whole` counts how
many were accepted.
Errors are measured in each cell's own sides (`worst_error`), so a half cell's error across its short
side counts in its short side.

    python -m benchmarks.geometry_stress --frames 1500 --seed 7
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from dataclasses import replace

import numpy as np

from benchmarks.geometry_accuracy import CENTRE_TOLERANCE
from datasets.elpv import ElpvCells, load_elpv
from datasets.synthetic import FrameSpec, SyntheticFrame, random_spec, render_frame
from model.geometry import ModuleGeometry, cut_module

log = logging.getLogger(__name__)

WRONG_FROM = 0.10  # a centre error (of the cell's side) from which a cut cell shows another part
DARK_CELLS = 200  # the edge row or column is drawn from this many darkest ELPV cells


def stress_spec(rng: np.random.Generator, half_cut_share: float) -> FrameSpec:
    """A frame spec past the generator's own ranges (see the module docstring)."""
    spec = random_spec(rng, cell_px=(70.0, 200.0), half_cut_share=half_cut_share)
    return replace(
        spec,
        rotation_deg=float(rng.uniform(-14, 14)),
        perspective=float(rng.uniform(0.0, 0.07)),
        vignetting=float(rng.uniform(0.0, 0.35)),
        gain=float(rng.uniform(0.7, 1.1)),
        noise_sigma=float(rng.uniform(0.0, 12.0)),
    )


def layout(
    rng: np.random.Generator, spec: FrameSpec, cell_count: int, dark: np.ndarray, dark_edge: bool
) -> np.ndarray:
    """Row-major cell indices; with `dark_edge`, one edge row or column (drawn) of dark cells."""
    grid = rng.choice(cell_count, size=(spec.rows, spec.cols))
    if dark_edge:
        side = int(rng.integers(4))
        if side < 2:
            grid[0 if side == 0 else -1] = rng.choice(dark, size=spec.cols)
        else:
            grid[:, 0 if side == 2 else -1] = rng.choice(dark, size=spec.rows)
    return grid.reshape(-1)


def worst_error(frame: SyntheticFrame, geometry: ModuleGeometry) -> float:
    """The largest cell-centre error, each measured in its cell's own sides: across the cell as a
    fraction of its width, along it of its height (a half cell's short side is the one that matters).
    The larger of the two components, not the distance: geometry_accuracy's acceptance figure is the
    distance in cell widths, up to 1.4 times this on a whole cell."""
    worst = 0.0
    for truth, found in zip(frame.cells, geometry.cells, strict=True):
        corners = truth.polygon.astype(np.float64)
        sides = np.column_stack([corners[1] - corners[0], corners[3] - corners[0]])
        along_sides = np.linalg.solve(sides, found.polygon.mean(axis=0) - corners.mean(axis=0))
        worst = max(worst, float(np.abs(along_sides).max()))
    return worst


def outcome(frame: SyntheticFrame, cells: ElpvCells) -> tuple[str, float]:
    geometry = cut_module(frame.image, frame.rows, frame.cols, cells.images.shape[1])
    if not geometry.ok:
        return "refused", float("inf")
    if len(geometry.cells) != len(frame.cells):
        return "wrong", float("inf")
    worst = worst_error(frame, geometry)
    if worst <= CENTRE_TOLERANCE:
        return "right", worst
    return ("off" if worst <= WRONG_FROM else "wrong"), worst


def whole_cell_grid(spec: FrameSpec) -> tuple[int, int]:
    """The rows x cols a line configured for whole cells gives a half-cut module: its half cells pair up
    along the module's long side (6x20 -> 6x10, 24x6 -> 12x6)."""
    if spec.cols >= spec.rows:
        return spec.rows, spec.cols // 2
    return spec.rows // 2, spec.cols


def accepted_as_whole(frame: SyntheticFrame, cells: ElpvCells) -> bool:
    """Whether a half-cut module's frame is cut (ok) under the whole-cell grid: a wrong grid passed."""
    rows, cols = whole_cell_grid(frame.spec)
    return cut_module(frame.image, rows, cols, cells.images.shape[1]).ok


def main(args: argparse.Namespace) -> dict[str, object]:
    cells = load_elpv()
    brightness = cells.images.reshape(len(cells.images), -1).mean(axis=1)
    dark = np.argsort(brightness)[:DARK_CELLS]
    rng = np.random.default_rng(args.seed)
    tally: Counter[str] = Counter()
    dark_tally: Counter[str] = Counter()
    as_whole: Counter[str] = Counter()
    for number in range(args.frames):
        spec = stress_spec(rng, args.half_cut_share)
        dark_edge = bool(rng.random() < args.dark_edge_share)
        indices = layout(rng, spec, len(cells.images), dark, dark_edge)
        frame = render_frame(cells, spec, rng, indices)
        kind, worst = outcome(frame, cells)
        tally[kind] += 1
        dark_tally[kind] += dark_edge
        if kind in ("off", "wrong"):
            log.warning("frame %d (%s, dark edge %s): worst %.3f", number, kind, dark_edge, worst)
        if spec.half_cut:
            as_whole["frames"] += 1
            if accepted_as_whole(frame, cells):
                as_whole["accepted"] += 1
                log.warning("frame %d: half-cut %dx%d accepted as whole cells", number, spec.rows, spec.cols)
    return {
        "benchmark": "geometry_stress",
        "frames": args.frames,
        "seed": args.seed,
        "dark_edge_share": args.dark_edge_share,
        "half_cut_share": args.half_cut_share,
        **{kind: tally[kind] for kind in ("right", "refused", "off", "wrong")},
        "dark_edge": {kind: dark_tally[kind] for kind in ("right", "refused", "off", "wrong")},
        "silent_wrong_fraction": round(tally["wrong"] / max(1, args.frames), 4),
        "half_cut_read_as_whole": {"frames": as_whole["frames"], "accepted": as_whole["accepted"]},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dark-edge-share", type=float, default=0.4)
    parser.add_argument("--half-cut-share", type=float, default=0.0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(main(parse_args())))
