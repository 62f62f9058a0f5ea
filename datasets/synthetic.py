"""Synthetic EL module frames composed of real ELPV cells, with the ground truth of every cell.

Owns: `FrameSpec` (what one frame looks like: grid, gaps, border, pose, lighting, noise, neighbour),
`random_spec` (a spec drawn from the ranges a line camera sees), `render_frame` (the picture and its
truth) and `generate_frames` (a reproducible stream of them). Frames feed the geometry tests, the
accuracy benchmark and the line simulator. Each cell's truth is its polygon in frame pixels (the
corners of the placed ELPV image, clockwise from top-left), the ELPV index, name and probability.

The cell images themselves are not altered beyond resampling, lighting and noise, so a classifier's
verdict on a cut cell can be compared with its verdict on the original ELPV cell.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from datasets.elpv import ElpvCells

log = logging.getLogger(__name__)

GRIDS = ((6, 10), (6, 12), (10, 6), (12, 6), (4, 9))  # rows x cols as imaged: landscape and portrait
# 120- and 144-cell half-cut modules: 6 strings of 20 / 24 half cells, imaged landscape or portrait
HALF_CUT_GRIDS = ((6, 20), (6, 24), (20, 6), (24, 6))
CENTRE_GAP = (0.06, 0.12)  # a half-cut module's two halves are parted by this much, fraction of a cell


@dataclass(frozen=True)
class FrameSpec:
    """Everything that decides one frame's look; sizes in frame pixels, fractions of a cell pitch."""

    rows: int = 6
    cols: int = 10
    cell_px: float = 120.0  # a cell's side in the frame, before perspective
    # Extra gap between placed cells: ELPV crops already hold about half a gap on each side.
    gap_range: tuple[float, float] = (0.005, 0.03)  # each gap's width, fraction of a cell
    border: float = 0.25  # the module frame's width around the cells, fraction of a cell
    margin: float = 0.12  # dark background around the module, fraction of the module's size
    rotation_deg: float = 0.0
    perspective: float = 0.0  # corner jitter, fraction of the module's size
    offset: tuple[float, float] = (0.0, 0.0)  # module centre shift, fraction of the spare margin
    vignetting: float = 0.0  # brightness falls by this fraction at the frame's corners
    noise_sigma: float = 0.0  # grey levels, Gaussian
    gain: float = 1.0  # overall EL brightness
    ribbons: bool = True  # dark ribbon stubs across the gaps and the border
    neighbour: str | None = None  # "left" or "right": a second module, cut off at that frame edge
    background: int = 12
    # Each placed cell is half of an ELPV cell, split across the grid's long axis (narrow cells on a
    # landscape grid, short ones on a portrait grid), and the module's two halves are parted by a
    # wider gap, as on 120/144-cell half-cut modules. `cell_px` is then the full cell's side.
    half_cut: bool = False

    @property
    def cell_size(self) -> tuple[int, int]:
        """A placed cell's (width, height) in plane pixels."""
        side = max(8, round(self.cell_px))
        if not self.half_cut:
            return side, side
        half = max(4, round(self.cell_px / 2))
        return (half, side) if self.cols >= self.rows else (side, half)


@dataclass(frozen=True)
class TruthCell:
    row: int
    col: int
    polygon: np.ndarray  # (4, 2) float32 frame pixels, clockwise from top-left
    index: int  # into the ElpvCells the frame was composed from
    name: str
    # of the whole ELPV cell: on a half cell a defect may lie in the half that is not shown, so a
    # half cell's label is not a verdict to compare with
    probability: float
    part: str = "whole"  # or the half shown: "left", "right", "top", "bottom"


@dataclass(frozen=True)
class SyntheticFrame:
    image: np.ndarray  # (H, W) uint8
    rows: int
    cols: int
    corners: np.ndarray  # (4, 2) float32: the outer corners of the cell area in the frame
    cells: list[TruthCell]
    spec: FrameSpec
    notes: list[str] = field(default_factory=list)

    @property
    def centres(self) -> np.ndarray:
        """(rows*cols, 2) cell centres in frame pixels, row-major."""
        return np.array([cell.polygon.mean(axis=0) for cell in self.cells], dtype=np.float64)


def random_spec(
    rng: np.random.Generator,
    grids: tuple[tuple[int, int], ...] = GRIDS,
    cell_px: tuple[float, float] = (90.0, 140.0),
    neighbour_probability: float = 0.25,
    half_cut_share: float = 0.0,
    half_cut_grids: tuple[tuple[int, int], ...] = HALF_CUT_GRIDS,
) -> FrameSpec:
    """A spec drawn from what a line camera sees: tilt up to 10 degrees, mild perspective, noise.

    `half_cut_share` of the frames show a half-cut module (one of `half_cut_grids`, in half cells); at
    0 no extra random number is drawn, so a seed gives the same frames as before half-cut modules existed.
    """
    half_cut = half_cut_share > 0 and bool(rng.random() < half_cut_share)
    choices = half_cut_grids if half_cut else grids
    rows, cols = choices[int(rng.integers(len(choices)))]
    neighbour = None
    if rng.random() < neighbour_probability:
        neighbour = "left" if rng.random() < 0.5 else "right"
    return FrameSpec(
        rows=rows,
        cols=cols,
        cell_px=float(rng.uniform(*cell_px)),
        border=float(rng.uniform(0.1, 0.35)),
        margin=float(rng.uniform(0.08, 0.2)),
        rotation_deg=float(rng.uniform(-10, 10)),
        perspective=float(rng.uniform(0.0, 0.04)),
        offset=(float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5))),
        vignetting=float(rng.uniform(0.0, 0.2)),
        noise_sigma=float(rng.uniform(0.0, 6.0)),
        gain=float(rng.uniform(0.9, 1.08)),
        ribbons=bool(rng.random() < 0.7),
        neighbour=neighbour,
        background=int(rng.integers(3, 30)),
        half_cut=half_cut,
    )


def module_plane(
    cells: ElpvCells, indices: np.ndarray, spec: FrameSpec, rng: np.random.Generator
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, list[str]]:
    """The upright module at `spec.cell_px` per cell: image, each cell's corners, the cell area's
    corners, and which part of its ELPV cell each placed cell shows."""
    cell_w, cell_h = spec.cell_size
    side = max(cell_w, cell_h)
    gaps_x = rng.uniform(*spec.gap_range, size=spec.cols - 1) * side  # uneven gaps, like real strings
    gaps_y = rng.uniform(*spec.gap_range, size=spec.rows - 1) * side
    if spec.half_cut:
        widen_centre_gap(gaps_x if spec.cols >= spec.rows else gaps_y, side, rng)
    border = max(2, round(spec.border * side))
    lefts = border + np.concatenate([[0.0], np.cumsum(cell_w + gaps_x)])
    tops = border + np.concatenate([[0.0], np.cumsum(cell_h + gaps_y)])
    width = math.ceil(lefts[-1] + cell_w + border)
    height = math.ceil(tops[-1] + cell_h + border)
    frame_level, gap_level = int(rng.integers(25, 60)), int(rng.integers(5, 30))
    plane = np.full((height, width), frame_level, dtype=np.uint8)
    x0, y0 = border, border
    plane[y0 : round(tops[-1] + cell_h), x0 : round(lefts[-1] + cell_w)] = gap_level
    polygons, parts = [], []
    for k, index in enumerate(indices):
        r, c = divmod(k, spec.cols)
        x, y = lefts[c], tops[r]
        part = cell_part(spec, rng)
        image = half_of(cells.images[index], part)
        flags = cv2.INTER_AREA if side < 300 else cv2.INTER_LINEAR
        scaled = cv2.resize(image, (cell_w, cell_h), interpolation=flags)
        place_subpixel(plane, scaled, x, y)
        # Pixel centres sit at integer coordinates: the cell's outer edges are half a pixel outside them.
        x, y = x - 0.5, y - 0.5
        polygons.append(
            np.array([[x, y], [x + cell_w, y], [x + cell_w, y + cell_h], [x, y + cell_h]], np.float64)
        )
        parts.append(part)
    if spec.ribbons:
        draw_ribbons(plane, lefts, tops, (cell_w, cell_h), gaps_y, border)
    area = (
        np.array(
            [
                [lefts[0], tops[0]],
                [lefts[-1] + cell_w, tops[0]],
                [lefts[-1] + cell_w, tops[-1] + cell_h],
                [lefts[0], tops[-1] + cell_h],
            ]
        )
        - 0.5
    )
    return plane, polygons, area, parts


def widen_centre_gap(gaps: np.ndarray, side: int, rng: np.random.Generator) -> None:
    """Part a half-cut module's two halves (junction boxes between them) wider than its cells."""
    if len(gaps):
        gaps[len(gaps) // 2] = rng.uniform(*CENTRE_GAP) * side


def cell_part(spec: FrameSpec, rng: np.random.Generator) -> str:
    """Which part of an ELPV cell a placed cell shows; no random number is drawn for whole cells."""
    if not spec.half_cut:
        return "whole"
    halves = ("left", "right") if spec.cols >= spec.rows else ("top", "bottom")
    return halves[int(rng.integers(2))]


def half_of(image: np.ndarray, part: str) -> np.ndarray:
    height, width = image.shape[:2]
    crops = {
        "whole": image,
        "left": image[:, : width // 2],
        "right": image[:, width // 2 :],
        "top": image[: height // 2],
        "bottom": image[height // 2 :],
    }
    return crops[part]


def place_subpixel(plane: np.ndarray, patch: np.ndarray, x: float, y: float) -> None:
    """Paste `patch` with its top-left pixel centre at (x, y): a translation warp keeps the truth
    exact without rounding; warping into a small window around it keeps it cheap."""
    left, top = math.floor(x), math.floor(y)
    window = plane[top : top + patch.shape[0] + 2, left : left + patch.shape[1] + 2].copy()
    shift = np.array([[1, 0, x - left], [0, 1, y - top]], dtype=np.float32)
    size = (window.shape[1], window.shape[0])
    cv2.warpAffine(patch, shift, size, dst=window, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT)
    plane[top : top + window.shape[0], left : left + window.shape[1]] = window


def draw_ribbons(
    plane: np.ndarray,
    lefts: np.ndarray,
    tops: np.ndarray,
    cell_size: tuple[int, int],
    gaps_y: np.ndarray,
    border: int,
) -> None:
    """Dark ribbon stubs where the cell strings' ribbons cross the gaps and leave through the border."""
    cell_w, cell_h = cell_size
    thickness = max(1, round(max(cell_size) * 0.012))
    for left in lefts:
        for fraction in (0.25, 0.75):  # two ribbons per string, at the busbars' usual places
            x = round(left + fraction * cell_w)
            cv2.line(plane, (x, 0), (x, border), 8, thickness)
            cv2.line(plane, (x, round(tops[-1] + cell_h)), (x, plane.shape[0] - 1), 8, thickness)
            for top, gap in zip(tops[1:], gaps_y, strict=True):
                # A ribbon across a gap is brighter than the gap: a reflection of the cells' glow.
                cv2.line(plane, (x, round(top - gap)), (x, round(top)), 45, thickness)


def pose(
    spec: FrameSpec, plane_size: tuple[int, int], rng: np.random.Generator
) -> tuple[np.ndarray, tuple[int, int]]:
    """Homography from plane to frame pixels, and the frame's (width, height)."""
    width, height = plane_size
    angle = math.radians(spec.rotation_deg)
    cos, sin = abs(math.cos(angle)), abs(math.sin(angle))
    extent_w = width * cos + height * sin
    extent_h = width * sin + height * cos
    room = 1.0 + 2 * spec.margin + 2 * spec.perspective
    frame_w, frame_h = math.ceil(extent_w * room), math.ceil(extent_h * room)
    if spec.neighbour:
        frame_w = math.ceil(frame_w + 0.25 * extent_w)  # room for the neighbour's visible part
    spare_x = (frame_w - extent_w * (1 + 2 * spec.perspective)) / 2
    spare_y = (frame_h - extent_h * (1 + 2 * spec.perspective)) / 2
    centre_x = frame_w / 2 + spec.offset[0] * spare_x * 0.8
    centre_y = frame_h / 2 + spec.offset[1] * spare_y * 0.8
    if spec.neighbour == "left":
        centre_x = frame_w - spare_x - extent_w / 2 - 0.02 * frame_w
    elif spec.neighbour == "right":
        centre_x = spare_x + extent_w / 2 + 0.02 * frame_w
    source = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    target = (source - [width / 2, height / 2]) @ rotation.T + [centre_x, centre_y]
    target += rng.uniform(-1, 1, size=(4, 2)) * spec.perspective * max(width, height)
    matrix = cv2.getPerspectiveTransform(source.astype(np.float32), target.astype(np.float32))
    return matrix.astype(np.float64), (frame_w, frame_h)


def to_frame(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    return cv2.perspectiveTransform(points.reshape(-1, 1, 2).astype(np.float64), matrix).reshape(-1, 2)


def render_frame(
    cells: ElpvCells, spec: FrameSpec, rng: np.random.Generator, indices: np.ndarray | None = None
) -> SyntheticFrame:
    """One frame: the module composed of `indices` (or random cells), posed, lit and noised."""
    count = spec.rows * spec.cols
    if indices is None:
        indices = rng.choice(len(cells), size=count, replace=count > len(cells))
    plane, polygons, area, parts = module_plane(cells, np.asarray(indices), spec, rng)
    matrix, (frame_w, frame_h) = pose(spec, (plane.shape[1], plane.shape[0]), rng)
    # Background: dark, with a faint gradient (stray light).
    yy, xx = np.mgrid[0:frame_h, 0:frame_w].astype(np.float32)
    image = spec.background + 10.0 * xx / frame_w
    notes = []
    if spec.neighbour:
        image = paste(image, neighbour_plane(cells, spec, rng), neighbour_matrix(matrix, spec, plane.shape))
        notes.append(f"a second module cut off at the {spec.neighbour} edge")
    image = paste(image, plane, matrix)
    radius2 = ((xx - frame_w / 2) ** 2 + (yy - frame_h / 2) ** 2) / ((frame_w / 2) ** 2 + (frame_h / 2) ** 2)
    image *= spec.gain * (1.0 - spec.vignetting * radius2)
    if spec.noise_sigma > 0:
        image += rng.normal(0.0, spec.noise_sigma, size=image.shape).astype(np.float32)
    frame = np.clip(image, 0, 255).astype(np.uint8)
    truth = []
    for k, polygon in enumerate(polygons):
        r, c = divmod(k, spec.cols)
        index = int(indices[k])
        truth.append(
            TruthCell(
                r,
                c,
                to_frame(polygon, matrix).astype(np.float32),
                index,
                str(cells.names[index]),
                float(cells.probabilities[index]),
                parts[k],
            )
        )
    corners = to_frame(area, matrix).astype(np.float32)
    return SyntheticFrame(frame, spec.rows, spec.cols, corners, truth, spec, notes)


def paste(image: np.ndarray, plane: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """`plane` warped by `matrix` over the float image (its own pixels replace the background)."""
    size = (image.shape[1], image.shape[0])
    warped = cv2.warpPerspective(plane.astype(np.float32), matrix, size, flags=cv2.INTER_LINEAR)
    coverage = cv2.warpPerspective(np.ones(plane.shape, np.float32), matrix, size, flags=cv2.INTER_LINEAR)
    return image * (1.0 - coverage) + warped


def neighbour_plane(cells: ElpvCells, spec: FrameSpec, rng: np.random.Generator) -> np.ndarray:
    indices = rng.choice(len(cells), size=spec.rows * spec.cols, replace=True)
    plane, _, _, _ = module_plane(cells, indices, spec, rng)
    return plane


def neighbour_matrix(matrix: np.ndarray, spec: FrameSpec, plane_shape: tuple[int, ...]) -> np.ndarray:
    """The main module's pose shifted sideways by its width and a hand's breadth of gap."""
    step = plane_shape[1] * (1.08 if spec.neighbour == "right" else -1.08)
    shift = np.array([[1, 0, step], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    return matrix @ shift


def generate_frames(
    cells: ElpvCells,
    count: int,
    seed: int = 0,
    grids: tuple[tuple[int, int], ...] = GRIDS,
    cell_px: tuple[float, float] = (90.0, 140.0),
    neighbour_probability: float = 0.25,
    photometric: bool = True,
    defect_rate: float | None = None,
    half_cut_share: float = 0.0,
    half_cut_grids: tuple[tuple[int, int], ...] = HALF_CUT_GRIDS,
) -> Iterator[SyntheticFrame]:
    """A reproducible stream of `count` frames with random specs (same seed, same frames).

    `photometric=False` keeps the same poses, grids and cells but drops gain, vignetting and noise:
    it separates what the geometry does to a cell from what lighting does to a classifier.
    `defect_rate` (0..1): modules are built from functional cells, and that share of them get one to
    three defective ones; None draws cells at random (about a quarter of ELPV's cells are defective).
    """
    rng = np.random.default_rng(seed)
    for _ in range(count):
        spec = random_spec(rng, grids, cell_px, neighbour_probability, half_cut_share, half_cut_grids)
        if not photometric:
            spec = replace(spec, vignetting=0.0, noise_sigma=0.0, gain=1.0)
        indices = (
            None if defect_rate is None else factory_indices(cells, spec.rows * spec.cols, defect_rate, rng)
        )
        yield render_frame(cells, spec, rng, indices)


def factory_indices(cells: ElpvCells, count: int, defect_rate: float, rng: np.random.Generator) -> np.ndarray:
    """Cells for one module as a line sees them: functional, and with `defect_rate` a few defective."""
    functional = np.flatnonzero(cells.probabilities == 0)
    defective = np.flatnonzero(cells.probabilities >= 0.5)
    if len(functional) == 0:
        raise ValueError("expected functional cells (probability 0) to build modules from")
    indices = rng.choice(functional, size=count, replace=count > len(functional))
    if len(defective) and rng.random() < defect_rate:
        flawed = min(count, int(rng.integers(1, 4)))
        indices[rng.choice(count, size=flawed, replace=False)] = rng.choice(defective, size=flawed)
    return indices
