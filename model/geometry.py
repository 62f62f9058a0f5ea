"""Module geometry: find a solar module in an EL frame, correct its perspective, cut the cell grid.

Owns: `cut_module` (the one entry point training and serving share, so reviewed modules are cut
exactly as serving cut them), `find_modules` (every module in view), the result types `ModuleGeometry`
and `CellCut`, and `draw_grid` (the found grid over a frame, for test pictures and the review page).

How it works, top to bottom:
1. Locate on a downscaled copy (bounded memory and time): Otsu threshold of the glowing cells, a
   closing that bridges the dark gaps and cracks, outer contours; each plausible contour becomes a
   quadrilateral whose sides are RANSAC-fitted to the contour (so cut cell corners and dark border
   cells do not pull the corners). Contours touching the frame edge are modules cut off: ignored.
2. Rectify: a perspective warp of the full-resolution frame to an upright module image at a fixed
   pitch per cell, keeping the measured cell aspect (half-cut cells are 2:1), with a margin around.
3. Grid: every inner gap line is searched near its evenly divided position, band by band (one band
   per row or column of cells), as the darkest valley of the band's profile; the outer lines as the
   step into the glowing cells. A straight line is fitted through the band positions, so uneven gaps
   and slightly tilted lines are followed.
4. Check: the confidence is, for the weaker of the two axes, the share of (line, band) places where a
   clear gap lies on the line. Busbars, cracks and noise give fainter valleys, so a wrong rows x cols
   lands its lines on them and scores low; below MIN_CONFIDENCE the result is ok=False, no cells.
   A grid too coarse (3x5 configured for a 6x10 module, 6x10 for a half-cut 12x10) puts its lines on
   gaps too, so the same test is run on the lines a 2x and 3x finer grid would add: when clear gaps lie
   there, the cells hold gaps and the result is ok=False with that reason. A grid too fine (12x10 for
   6x10) has only every 2nd (3rd) line on a gap, the others on busbars, far fainter: refused too.
5. Edges: the lines run along the middle of the gaps; each is moved out to the edges of its gap,
   measured across it in the full-resolution frame, so a cell is cut without slivers of gap (a
   classifier sees it as it was photographed for training). A module's cells are all of one size: a
   cell side far from the median (MAX_CELL_SIDE_SPREAD) means a wrong outline (a notch where dark cells
   sit at the module's edge) or a line off its gap. The outline is then taken again from the crossings
   of the well-supported gap lines (`lattice_corners`) and, if it holds the located outline
   (`lattice_holds_outline`: a notch makes the located one smaller, never larger), steps 2-5 run once
   more; cells still uneven give ok=False.
6. Cut: each cell's quadrilateral is mapped back to the frame and resampled once, from the original
   pixels, to cell_size x cell_size; a half cell in its own proportions, then judged as two mirrored
   squares (`cell_views`, model.preprocess.half_cell_views).
A frame that is already a rectified module filling the image (no background) skips step 1 and is
cut evenly (the gaps only vouch for the grid), so a mosaic of cells comes back tile for tile; when its
gaps are not where an even cut puts them (a tilted module or its frame filling the picture), it is
refused: there is no outline to rectify it by.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field, replace
from typing import Literal

import cv2
import numpy as np

from model.preprocess import (
    ImageFormatError,
    half_cell_shape,
    image_picture,
    is_half_cell,
    picture_views,
    resize_to,
    to_grey_u8,
)

log = logging.getLogger(__name__)

MAX_PIXELS = 64_000_000  # refuse larger frames: a 16-bit 64 MP frame already costs ~0.5 GB to convert
MIN_SIDE = 32  # smaller frames cannot hold a module worth judging
LOCATE_SIDE = 1024  # the long side of the copy the module is located on
RECTIFIED_PITCH = 80  # pixels per cell (along x) in the rectified image the grid is searched in
SEARCH_FRACTION = 0.13  # gap search window, +- this fraction of a pitch around the even position
CHAIN_REACH = 0.3  # a weak line searched again from its neighbour stays this close to its even position
MIN_CHAINED_STEP = 0.8  # ... and a line it moves keeps at least this many true pitches from its neighbours
MIN_VALLEY_CONTRAST = 0.04  # weaker valleys do not steer a line (relative darkness)
GAP_RELATIVE = 0.65  # ... and at least this fraction as dark as the band's darkest lines
GAP_CONTRAST = 0.15  # a valley this dark is a gap between cells; texture and noise stay below 0.1
LINE_TOLERANCE = 0.05  # band positions further than this fraction of a pitch from the line are outliers
FIT_TOLERANCE = 0.02  # ... and those further than this do not steer the fitted line
MAX_LINE_SLOPE = 0.05  # a grid line in the rectified module tilts at most this much
NEAR_TIE = 0.9  # a second module at least this fraction of the largest's area ties with it
MIN_CONFIDENCE = 0.55  # below this the found gaps do not support the configured grid
SUBDIVISIONS = (2, 3)  # a grid this many times finer is checked for gaps inside the configured cells
MAX_HIDDEN_SUPPORT = 0.5  # ... and refused when its extra lines are supported as often as this
FINER_DARKNESS = 0.6  # a grid 2x/3x too fine: its off-gap lines are less than this as dark as the rest
# ... and so much fainter than this that their support cannot vouch for them: busbars, whose support
# is inflated when the gap reference itself comes from the strongest lines of a too-fine grid
FAR_FAINTER = 0.45
RECTIFIED_TOLERANCE = 0.04  # a rectified input's gaps lie within this fraction of a pitch of even
UNCHECKED_CONFIDENCE = 0.6  # a 1x1 grid: nothing contradicts it, nothing confirms it
MIN_CELL_ASPECT, MAX_CELL_ASPECT = 0.4, 2.6  # cell height / width: square, half-cut 1:2 or 2:1
MIN_MODULE_FRACTION = 0.02  # a module covers at least this fraction of the frame
FILLING_FRACTION = 0.95  # a bright area spanning this much of both sides is a rectified module
EDGE_MARGIN = 0.15  # searched beyond the located outline for the outer cell edges, fraction of a pitch
EDGE_WINDOW = 0.08  # a gap's edges are searched within +- this fraction of a pitch of its line
# ... widened (doubling) up to this for a gap wider than the window, e.g. the centre gap between the two
# halves of a half-cut module, which reads as a faint gap while its floor fills the window
MAX_EDGE_WINDOW = 0.4
EDGE_LEVEL = 0.15  # a cell starts where the profile has climbed this share from the gap to the cell
EDGE_STEP = 0.5  # frame pixels between samples across a gap
EDGE_SAMPLES = 16  # samples along each cell's side, per band
MIN_EDGE_CONTRAST = 0.15  # a gap shallower than this (relative to the cells) keeps its centre line
# A module's cells are all of one size (a half-cut module's halves too), so a cut cell whose side differs
# from the median by more than this fraction of the pitch along that side is a wrong outline or grid. On
# frames beyond the generator's ranges (benchmarks/geometry_stress.py; 900 whole-cell, 500 half-cut)
# right grids reached 0.073 (half-cut 0.094); grids cut more than 10 % of a cell wrong, most by an
# outline notched where dark cells sit at the module's edge, 0.139-0.59.
MAX_CELL_SIDE_SPREAD = 0.12
# An outline taken from the grid replaces the located one only if this holds the located one, whose
# corners may lie this many pitches outside it (a refined outline of a right grid: up to 0.02; a grid
# configured one column or row short: 0.8-1.1) and this many inside (a notch; a deeper one has no
# clear gaps left to find the grid by)
LATTICE_OUTSIDE, LATTICE_INSIDE = 0.25, 1.0


@dataclass(frozen=True)
class CellCut:
    """One cell: its place in the upright module, what the model judges of it, its outline in the frame."""

    row: int
    col: int
    views: np.ndarray  # (V, cell_size, cell_size) uint8: 1 for a whole cell, 2 for a half (cell_views)
    polygon: np.ndarray  # (4, 2) float32, frame pixels, clockwise from top-left

    @property
    def image(self) -> np.ndarray:
        """The first view: a whole cell's only one."""
        return self.views[0]


@dataclass(frozen=True)
class ModuleGeometry:
    """The module found in a frame; `ok=False` carries a reason a person can act on and no cells.

    `rows`/`cols` are as the module appears in the frame; `corners` (frame pixels, clockwise from
    top-left) may be set on a refusal, to show what was found; `confidence` is in [0, 1].
    """

    ok: bool
    reason: str | None
    confidence: float
    rows: int
    cols: int
    corners: np.ndarray | None  # (4, 2) float32 frame pixels, clockwise from top-left
    cells: list[CellCut] = field(default_factory=list)
    modules_in_view: int = 0
    notes: list[str] = field(default_factory=list)


def refused(
    reason: str,
    rows: int,
    cols: int,
    corners: np.ndarray | None = None,
    modules_in_view: int = 0,
    notes: list[str] | None = None,
) -> ModuleGeometry:
    log.info("module geometry refused: %s", reason)
    return ModuleGeometry(False, reason, 0.0, rows, cols, corners, [], modules_in_view, notes or [])


# ---------------------------------------------------------------------------------------------
# public entry points


def cut_module(
    frame: np.ndarray, rows: int, cols: int, cell_size: int, *, max_pixels: int = MAX_PIXELS
) -> ModuleGeometry:
    """Find the largest plausible module in `frame`, rectify it and cut rows x cols cells.

    Never raises for a bad image: every failure is `ok=False` with a reason (serving answers REVIEW).
    """
    modules = find_modules(frame, rows, cols, cell_size, max_pixels=max_pixels)
    return modules[0]


def find_modules(
    frame: np.ndarray, rows: int, cols: int, cell_size: int, *, max_pixels: int = MAX_PIXELS
) -> list[ModuleGeometry]:
    """Every plausible module in view, largest first (at least one result, possibly not ok)."""
    try:
        return _find_modules(frame, rows, cols, cell_size, max_pixels)
    except Exception as exc:  # the promise to serving: a bad frame is a REVIEW, never a 500
        log.exception("module geometry failed")
        return [refused(f"module geometry failed on this frame: {type(exc).__name__}: {exc}", rows, cols)]


def draw_grid(frame: np.ndarray, geometry: ModuleGeometry, thickness: int = 0) -> np.ndarray:
    """A BGR copy of `frame` with the module outline (green) and every cell polygon (red) drawn."""
    grey = to_grey_u8(frame)
    picture = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    thickness = thickness or max(1, round(max(grey.shape) / 800))
    for cell in geometry.cells:
        points = np.round(cell.polygon).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(picture, [points], True, (0, 0, 255), thickness, cv2.LINE_AA)
    if geometry.corners is not None:
        points = np.round(geometry.corners).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(picture, [points], True, (0, 255, 0), thickness, cv2.LINE_AA)
    return picture


# ---------------------------------------------------------------------------------------------
# input checks and locating


def check_frame(frame: object, rows: int, cols: int, cell_size: int, max_pixels: int) -> str | None:
    """The reason this input cannot be a module frame, or None."""
    if rows < 1 or cols < 1:
        return f"expected a grid of at least 1x1 cells, got rows={rows} cols={cols}"
    if cell_size < 1:
        return f"expected a positive cell size, got {cell_size}"
    if not isinstance(frame, np.ndarray):
        return f"expected the frame as a numpy array, got {type(frame).__name__}"
    if frame.ndim not in (2, 3) or frame.size == 0:
        return f"expected a 2-D grey frame, got shape {frame.shape}"
    height, width = frame.shape[:2]
    if height * width > max_pixels:
        return f"frame of {width}x{height} pixels exceeds the limit of {max_pixels} pixels"
    if frame.dtype.kind == "f" and not np.isfinite(frame).all():
        return "frame holds NaN or infinite values: expected grey levels"
    if min(height, width) < MIN_SIDE:
        return f"frame of {width}x{height} pixels is too small to hold a module (at least {MIN_SIDE})"
    return None


def _find_modules(
    frame: np.ndarray, rows: int, cols: int, cell_size: int, max_pixels: int
) -> list[ModuleGeometry]:
    problem = check_frame(frame, rows, cols, cell_size, max_pixels)
    if problem:
        return [refused(problem, rows, cols)]
    try:
        grey = to_grey_u8(frame)
    except ImageFormatError as exc:
        return [refused(str(exc), rows, cols)]
    small, scale = downscale(grey, LOCATE_SIDE)
    if float(small.std()) < 2.0:
        return [refused("blank frame: no contrast, no module in view", rows, cols)]

    mask = module_mask(small)
    if filling_region(mask):
        # No background around the bright area: a module already rectified to fill the image.
        height, width = grey.shape
        # Outer pixel edges (pixel centres are integers), so a mosaic of tiles is cut back exactly.
        corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32) - 0.5
        return [grid_and_cut(grey, corners, rows, cols, cell_size, 1, ["rectified input"], find_edges=False)]
    candidates, partial = module_candidates(mask)
    if not candidates:
        if partial:
            return [refused("the module is cut off at the frame edge: frame the whole module", rows, cols)]
        return [refused("no module found: no bright rectangular region of plausible size", rows, cols)]

    candidates, tie = judged_first(candidates, small.shape)
    notes = []
    if partial:
        notes.append(f"{partial} module(s) cut off at the frame edge ignored")
    if tie:
        notes.append(
            f"{len(candidates)} modules in view, the largest of nearly the same size; the one nearest "
            "the centre is judged"
        )
    elif len(candidates) > 1:
        notes.append(f"{len(candidates)} modules in view; the largest is judged")
    results = []
    for quad in candidates:
        corners = (quad / scale).astype(np.float32)
        results.append(grid_and_cut(grey, corners, rows, cols, cell_size, len(candidates), list(notes)))
    return results


def judged_first(candidates: list[np.ndarray], shape: tuple[int, ...]) -> tuple[list[np.ndarray], bool]:
    """The candidates (largest first) with the one to judge first, and whether sizes nearly tied.

    The largest module is the line's own; but two whole modules of nearly the same size leave that
    to a few pixels of outline, so the one the camera is aimed at, nearest the centre, is judged.
    """
    areas = [float(cv2.contourArea(quad)) for quad in candidates]
    tied = [i for i, area in enumerate(areas) if area >= NEAR_TIE * areas[0]]
    if len(tied) < 2:
        return candidates, False
    centre = np.array([shape[1], shape[0]], np.float32) / 2
    pick = min(tied, key=lambda i: float(np.linalg.norm(candidates[i].mean(axis=0) - centre)))
    return [candidates[pick], *(quad for i, quad in enumerate(candidates) if i != pick)], True


def downscale(grey: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    """A copy whose long side is at most `long_side`, and the factor applied."""
    scale = min(1.0, long_side / max(grey.shape))
    if scale >= 1.0:
        return grey, 1.0
    size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
    return cv2.resize(grey, size, interpolation=cv2.INTER_AREA), scale


def module_mask(small: np.ndarray) -> np.ndarray:
    """Glowing area: Otsu on a blurred copy, closed so gaps, busbars and cracks do not split it."""
    blurred = cv2.GaussianBlur(small, (5, 5), 0)
    _, mask = cv2.threshold(blurred, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    side = max(3, round(max(small.shape) * 0.015)) | 1  # wider than a gap, narrower than two modules' gap
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (side, side))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel)
    # Opening removes speckle (noise, small reflections) that could join a module to clutter.
    return cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)


def filling_region(mask: np.ndarray) -> bool:
    """Does the bright area span (nearly) the whole frame, with no background around it?

    The union of all bright pixels is used: in a single cell or a mosaic, busbars and dark cells may
    split the glow into pieces that no closing should bridge.
    """
    points = cv2.findNonZero(mask)
    if points is None:
        return False
    _, _, w, h = cv2.boundingRect(points)
    height, width = mask.shape
    return w >= FILLING_FRACTION * width and h >= FILLING_FRACTION * height


def module_candidates(mask: np.ndarray) -> tuple[list[np.ndarray], int]:
    """Plausible modules' quadrilaterals (small-image pixels), largest first; and how many touch the edge."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    height, width = mask.shape
    min_area = MIN_MODULE_FRACTION * height * width
    found: list[tuple[float, np.ndarray]] = []
    partial = 0
    for contour in contours:
        area = cv2.contourArea(contour)
        if area < min_area:
            continue
        x, y, w, h = cv2.boundingRect(contour)
        if x <= 1 or y <= 1 or x + w >= width - 1 or y + h >= height - 1:
            partial += 1
            continue
        quad = fit_quadrilateral(contour.reshape(-1, 2).astype(np.float32))
        if quad is None:
            continue
        quad_area = cv2.contourArea(quad)
        # A module's glowing area fills its quadrilateral; clutter and L-shapes do not.
        if quad_area <= 0 or area / quad_area < 0.8 or area / quad_area > 1.1:
            continue
        found.append((quad_area, quad))
    found.sort(key=lambda item: -item[0])
    return [quad for _, quad in found], partial


def order_clockwise(points: np.ndarray) -> np.ndarray:
    """(4, 2) corners clockwise (in image coordinates) starting at the top-left one."""
    centre = points.mean(axis=0)
    angles = np.arctan2(points[:, 1] - centre[1], points[:, 0] - centre[0])
    ordered = points[np.argsort(angles)]  # from -pi: top-left first for tilts under 45 degrees
    start = int(np.argmin(ordered[:, 0] + ordered[:, 1]))
    return np.roll(ordered, -start, axis=0).astype(np.float32)


def fit_quadrilateral(points: np.ndarray) -> np.ndarray | None:
    """Four corners of a contour: the sides of its minimum-area rectangle, each refitted to the contour.

    Each contour point votes for the rectangle side it lies nearest to; a line is fitted to each
    side's votes and refitted on its inliers, so a dark cell at the border (a notch), cut cell
    corners and rounded frame corners do not pull the corners, while perspective is followed.
    """
    if len(points) < 8:
        return None
    box = order_clockwise(cv2.boxPoints(cv2.minAreaRect(points)).astype(np.float32))
    perimeter = cv2.arcLength(box.reshape(-1, 1, 2), True)
    tolerance = max(1.5, 0.0015 * perimeter)  # a few pixels: an outline is straight to within its jaggies
    distances, alongs = [], []
    for i in range(4):
        a, b = box[i], box[(i + 1) % 4]
        length = max(float(np.hypot(*(b - a))), 1e-6)
        unit = (b - a) / length
        relative = points - a
        distances.append(np.abs(relative @ np.array([-unit[1], unit[0]])))
        alongs.append((relative @ unit) / length)
    nearest = np.argmin(np.stack(distances), axis=0)
    lines = []
    for i in range(4):
        chosen = (nearest == i) & (alongs[i] > 0.1) & (alongs[i] < 0.9)
        line = fit_side(points[chosen], tolerance)
        if line is None:
            return box
        lines.append(line)
    corners = [intersect(lines[i - 1], lines[i]) for i in range(4)]
    if any(c is None for c in corners):
        return box
    quad = np.array(corners, dtype=np.float32)
    # A corner far from the rectangle's means a side fit was fooled: keep the rectangle.
    if float(np.abs(quad - box).max()) > 0.08 * perimeter:
        return box
    return order_clockwise(quad)


def fit_side(points: np.ndarray, tolerance: float, tries: int = 128) -> np.ndarray | None:
    """(vx, vy, x0, y0) of the line through most of `points` (RANSAC, then least squares on inliers).

    RANSAC because a dark border cell leaves a notch of up to a third of a short side's points,
    enough to tilt any weighted fit; the seed is fixed so a frame always gets the same answer.
    """
    if len(points) < 5:
        return None
    rng = np.random.default_rng(0)
    pairs = rng.integers(0, len(points), size=(tries, 2))
    origins = points[pairs[:, 0]].astype(np.float64)
    directions = points[pairs[:, 1]] - origins
    lengths = np.hypot(directions[:, 0], directions[:, 1])
    usable = lengths >= 4 * tolerance  # two points too close together say nothing about a direction
    if not usable.any():
        return None
    normals = np.stack([-directions[:, 1], directions[:, 0]], axis=1) / np.maximum(lengths, 1e-9)[:, None]
    # every try at once: (tries, points) distances; the first try with the most inliers wins
    offsets = normals @ points.T.astype(np.float64) - np.sum(normals * origins, axis=1)[:, None]
    counts = np.where(usable, (np.abs(offsets) <= tolerance).sum(axis=1), -1)
    best = int(np.argmax(counts))
    origin, normal = origins[best], normals[best]
    inliers = points[np.abs((points - origin) @ normal) <= tolerance].astype(np.float32)
    return cv2.fitLine(inliers, cv2.DIST_L2, 0, 0.01, 0.01).reshape(4).astype(np.float64)


def intersect(first: np.ndarray, second: np.ndarray) -> np.ndarray | None:
    """The crossing of two (vx, vy, x0, y0) lines, or None when they are (nearly) parallel."""
    v1, p1, v2, p2 = first[:2], first[2:], second[:2], second[2:]
    det = v1[0] * (-v2[1]) - v1[1] * (-v2[0])
    if abs(det) < 1e-9:
        return None
    t = ((p2[0] - p1[0]) * (-v2[1]) - (p2[1] - p1[1]) * (-v2[0])) / det
    return p1 + t * v1


# ---------------------------------------------------------------------------------------------
# rectify, grid, cut


def side_lengths(corners: np.ndarray) -> tuple[float, float]:
    """Mean width (top and bottom sides) and mean height (left and right sides) of a quadrilateral."""
    tl, tr, br, bl = corners
    width = (np.hypot(*(tr - tl)) + np.hypot(*(br - bl))) / 2
    height = (np.hypot(*(bl - tl)) + np.hypot(*(br - tr))) / 2
    return float(width), float(height)


def grid_and_cut(
    grey: np.ndarray,
    corners: np.ndarray,
    rows: int,
    cols: int,
    cell_size: int,
    modules_in_view: int,
    notes: list[str],
    find_edges: bool = True,
    refine: bool = True,
) -> ModuleGeometry:
    """Rectify the module inside `corners`, find its gaps, cut the cells.

    Where the cells come out of uneven size, the outline is taken again from the well-supported grid
    lines (`lattice_corners`) and the module rectified once more (`refine`); if that does not give
    cells of one size either, the grid is refused.
    """
    width, height = side_lengths(corners)
    if width < cols * 4 or height < rows * 4:
        return refused(
            f"module of {width:.0f}x{height:.0f} pixels is too small for {rows}x{cols} cells", rows, cols
        )
    aspect = (height / rows) / (width / cols)  # cell height / width under the configured grid
    if not MIN_CELL_ASPECT <= aspect <= MAX_CELL_ASPECT:
        transposed = (height / cols) / (width / rows)
        hint = ""
        if MIN_CELL_ASPECT <= transposed <= MAX_CELL_ASPECT:
            hint = f"; it looks like {cols}x{rows} (rows x cols as the module appears in the frame)"
        return refused(
            f"module outline {width:.0f}x{height:.0f} does not fit a {rows}x{cols} grid{hint}",
            rows,
            cols,
            corners=corners,
            modules_in_view=modules_in_view,
            notes=notes,
        )

    pitch_x = float(RECTIFIED_PITCH)
    pitch_y = float(np.clip(RECTIFIED_PITCH * aspect, 8, 4 * RECTIFIED_PITCH))
    # Around a located outline, keep a margin so the true outer cell edges can be searched; a frame
    # that is the module has nothing outside it to search.
    margin = EDGE_MARGIN if find_edges else 0.0
    margin_x, margin_y = margin * pitch_x, margin * pitch_y
    rect_w, rect_h = round(cols * pitch_x + 2 * margin_x), round(rows * pitch_y + 2 * margin_y)
    target = np.array(
        [[0, 0], [cols * pitch_x, 0], [cols * pitch_x, rows * pitch_y], [0, rows * pitch_y]], dtype=np.float32
    ) + np.array([margin_x, margin_y], dtype=np.float32)
    to_rect = cv2.getPerspectiveTransform(corners.astype(np.float32), target)
    # Bilinear (warps have no area mode): band profiles average hundreds of samples per gap, so a
    # gap thinner than the sampling step still darkens them.
    rectified = cv2.warpPerspective(
        grey, to_rect, (rect_w, rect_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
    )
    x_axis = grid_lines(rectified, cols, rows, (pitch_x, pitch_y), (margin_x, margin_y), find_edges)
    y_axis = grid_lines(rectified.T, rows, cols, (pitch_y, pitch_x), (margin_y, margin_x), find_edges)
    xs, ys = x_axis.lines, y_axis.lines
    # Each axis must be supported on its own: a right column count cannot vouch for a wrong row count.
    axes = [float(np.mean(axis.support)) for axis in (x_axis, y_axis) if axis.support]
    confidence = min(axes) if axes else UNCHECKED_CONFIDENCE
    if not axes:
        notes = [*notes, "a 1x1 grid has no gaps to check"]
    problem = grid_problem(x_axis, y_axis, rows, cols, (pitch_x, pitch_y), (rect_w, rect_h), find_edges)
    if problem:
        log.info("module geometry refused: %s", problem)
        return ModuleGeometry(
            False,
            problem,
            min(confidence, 1.0 - max(x_axis.hidden, y_axis.hidden)),
            rows,
            cols,
            corners,
            [],
            modules_in_view,
            notes,
        )
    if confidence < MIN_CONFIDENCE:
        where = "no module outline found, and the whole frame" if not find_edges else "the module found"
        return ModuleGeometry(
            False,
            f"{where} does not show a {rows}x{cols} grid of cells (gap confidence {confidence:.2f} < "
            f"{MIN_CONFIDENCE}); check the line's rows and cols, or the frame",
            confidence,
            rows,
            cols,
            corners,
            [],  # no cells: nothing from a doubtful grid must reach the classifier
            modules_in_view,
            notes,
        )
    if not find_edges:
        # A rectified module is cut evenly: the gaps only vouch for the grid. Tiles composed edge to
        # edge then come back unchanged, and an upstream rectifier's layout is kept.
        xs = [(k * pitch_x, 0.0) for k in range(cols + 1)]
        ys = [(k * pitch_y, 0.0) for k in range(rows + 1)]
    from_rect = np.linalg.inv(to_rect)
    if find_edges:
        # The lines run along the middle of each gap; a cell ends where its gap begins, so the
        # classifier sees the cell as it was photographed for training, without slivers of gap.
        native = (width / (cols * pitch_x), height / (rows * pitch_y))
        x_bounds = gap_edges(
            grey, from_rect, xs, rows, (pitch_x, pitch_y), (margin_x, margin_y), native[0], False
        )
        y_bounds = gap_edges(
            grey, from_rect, ys, cols, (pitch_y, pitch_x), (margin_y, margin_x), native[1], True
        )
    else:
        x_bounds = [(xs[k], xs[k + 1]) for k in range(cols)]
        y_bounds = [(ys[k], ys[k + 1]) for k in range(rows)]
    pitches, margins = (pitch_x, pitch_y), (margin_x, margin_y)
    spread = cell_side_spread(x_bounds, y_bounds, (rows, cols), pitches, margins)
    if spread > MAX_CELL_SIDE_SPREAD:
        lattice = lattice_corners(x_axis, y_axis, to_rect, target, pitches, margins) if refine else None
        if lattice is not None and lattice_holds_outline(lattice, corners, (rows, cols), grey.shape):
            again = grid_and_cut(
                grey, lattice, rows, cols, cell_size, modules_in_view, notes, find_edges, refine=False
            )
            if again.ok:
                refined_note = (
                    "outline taken again from the grid's gap lines: the located one gave cells of uneven size"
                )
                return replace(again, notes=[*again.notes, refined_note])
        reason = (
            f"the cut cells are not all of one size (a side {spread:.2f} of the cell pitch off the median, "
            f"at most {MAX_CELL_SIDE_SPREAD}): the module's outline or a grid line is wrong, e.g. where dark "
            "cells sit at the module's edge; a person must look at this frame"
        )
        log.info("module geometry refused: %s", reason)
        return ModuleGeometry(False, reason, confidence, rows, cols, corners, [], modules_in_view, notes)
    cells = cut_cells(grey, from_rect, x_bounds, y_bounds, cell_size)
    return ModuleGeometry(True, None, confidence, rows, cols, corners, cells, modules_in_view, notes)


def grid_problem(
    x_axis: AxisGrid,
    y_axis: AxisGrid,
    rows: int,
    cols: int,
    pitches: tuple[float, float],
    extents: tuple[int, int],
    find_edges: bool,
) -> str | None:
    """Why the found gaps contradict the configured grid, beyond too little support; None if they don't."""
    for axis, name, count in ((x_axis, "columns", cols), (y_axis, "rows", rows)):
        every = only_every(axis)
        if every:
            return (
                f"the configured {rows}x{cols} grid is too fine: only one line in {every} lies on a gap "
                f"(the module shows {count // every} {name}, not {count}); check the line's rows and cols"
            )
    finer = []
    if x_axis.hidden >= MAX_HIDDEN_SUPPORT:
        finer.append(f"more than {cols} columns")
    if y_axis.hidden >= MAX_HIDDEN_SUPPORT:
        finer.append(f"more than {rows} rows")
    if finer:
        return (
            f"the configured {rows}x{cols} grid has gaps inside its cells: the module shows "
            f"{' and '.join(finer)} (half-cut cells?); check the line's rows and cols"
        )
    if not find_edges:
        # An even cut is only right for an upright module whose cells fill the picture; a tilted one,
        # or one whose frame fills it, has its gaps elsewhere and no outline to rectify it by.
        for axis, pitch, extent in ((x_axis, pitches[0], extents[1]), (y_axis, pitches[1], extents[0])):
            for k, (offset, slope) in enumerate(axis.lines[1:-1], start=1):
                if axis.support[k - 1] < MIN_CONFIDENCE:
                    continue  # a line few bands vouch for may be tilted by a crack: no evidence
                off = max(abs(offset - k * pitch), abs(offset + slope * extent - k * pitch))
                if off > RECTIFIED_TOLERANCE * pitch:
                    return (
                        "the module fills the picture but is not upright with its cells edge to edge "
                        f"(a gap lies {off / pitch:.2f} of a cell from where an even cut puts it); leave "
                        "a dark margin around the module so its outline can be found"
                    )
    return None


def only_every(axis: AxisGrid) -> int | None:
    """m if only every m-th inner line (m in SUBDIVISIONS) lies on a gap: the grid is m times too fine.

    The others then lie on busbars or cell interiors: far fainter than the gap lines and not supported
    as gaps. Both must hold, so a module with wider gaps between strings is not taken for one; unless
    they are less than FAR_FAINTER as dark, which no gap between cells is, whatever its support says.
    """
    darkness, support = np.array(axis.darkness), np.array(axis.support)
    index = np.arange(1, len(darkness) + 1)
    for every in SUBDIVISIONS:
        if len(index) + 1 < 2 * every or (len(index) + 1) % every:
            continue
        on = index % every == 0
        strong = float(np.median(darkness[on]))
        if strong <= 0:
            continue
        ratio = float(np.median(darkness[~on])) / strong
        if ratio < FAR_FAINTER or (ratio < FINER_DARKNESS and float(np.mean(support[~on])) < MIN_CONFIDENCE):
            return every
    return None


def valley_strength(profile: np.ndarray, width: int) -> np.ndarray:
    """Black-hat of a 1-D profile relative to its local level: how much darker than its surroundings."""
    column = profile.astype(np.float32).reshape(1, -1)
    kernel = np.ones((1, width), np.uint8)
    closed = cv2.morphologyEx(column, cv2.MORPH_CLOSE, kernel, borderType=cv2.BORDER_REPLICATE)
    return ((closed - column) / np.maximum(closed, 8.0)).reshape(-1)


@dataclass(frozen=True)
class AxisGrid:
    """The lines found along one axis and the evidence for and against the configured count."""

    lines: list[tuple[float, float]]  # (offset, slope) per line, count + 1 of them
    support: list[float]  # per inner line: the share of bands with a clear gap on it
    hidden: float  # the largest mean support of the lines a SUBDIVISIONS-finer grid would add
    darkness: list[float]  # per inner line: the median over bands of its valley's strength


def grid_lines(
    image: np.ndarray,
    count: int,
    across: int,
    pitches: tuple[float, float],
    margins: tuple[float, float],
    find_edges: bool,
) -> AxisGrid:
    """The count+1 vertical lines of `image` as (offset, slope): x = offset + slope * y.

    Pass the transposed rectified image for the horizontal lines. Inner lines are the darkest valley
    near each even position; the outer two are the steepest step into the glowing cells when
    `find_edges`, else the image border. Also returns, per inner line, the fraction of bands whose
    valley lies on the fitted line (the evidence that the configured grid is what is imaged), and the
    same evidence for lines inside the cells (that the module has more cells than configured).
    """
    pitch, pitch_across = pitches
    margin, margin_across = margins
    band_edges = margin_across + np.arange(across + 1) * pitch_across
    centres = (band_edges[:-1] + band_edges[1:]) / 2
    window = max(2, round(SEARCH_FRACTION * pitch))
    profiles = []
    for band in range(across):
        # The middle 70% of a band, away from the gaps that cross it.
        lo = round(band_edges[band] + 0.15 * pitch_across)
        hi = max(lo + 1, round(band_edges[band + 1] - 0.15 * pitch_across))
        profile = image[lo:hi].mean(axis=0, dtype=np.float32)
        profiles.append(cv2.GaussianBlur(profile.reshape(1, -1), (5, 1), 0).reshape(-1))
    strengths = [valley_strength(profile, max(3, round(0.3 * pitch)) | 1) for profile in profiles]
    inside = (round(margin + 0.05 * pitch), round(margin + (count - 0.05) * pitch))
    references = np.array(
        [gap_reference(strength[inside[0] : inside[1]], count - 1) for strength in strengths]
    )
    search = BandSearch(strengths, references, centres, window)
    lines: list[tuple[float, float]] = []
    supports: list[float] = []
    darkness: list[float] = []
    for k in range(count + 1):
        expected = margin + k * pitch
        if k in (0, count):
            if not find_edges:
                lines.append((expected, 0.0))
                continue
            rising = k == 0
            found = steepest_steps(profiles, expected, window, rising)
            line, _ = fit_line(centres, found, expected, pitch)
        else:
            line, support, dark = search.line_near(expected, pitch)
            supports.append(support)
            darkness.append(dark)
        lines.append(line)
    chain_weak_lines(lines, supports, darkness, search, pitch, margin)
    if find_edges and count >= 3:
        lines[0], lines[-1] = steady_edges(lines)
    hidden = hidden_support(strengths, references, centres, lines, pitch) if count >= 2 else 0.0
    return AxisGrid(lines, supports, hidden, darkness)


@dataclass(frozen=True)
class BandSearch:
    """What a line search needs across one axis: each band's valley strengths, the band's gap
    darkness, the band centres (along the lines) and the search window (pixels)."""

    strengths: list[np.ndarray]
    references: np.ndarray
    centres: np.ndarray
    window: int

    def line_near(self, expected: float, pitch: float) -> tuple[tuple[float, float], float, float]:
        """The line through the bands' valleys near `expected`: (offset, slope), support, darkness."""
        found = band_valleys(np.asarray(self.strengths), expected, self.window)
        line, support = fit_line(self.centres, found, expected, pitch, self.references)
        return line, support, float(np.median([strength for _, strength in found]))


def chain_weak_lines(
    lines: list[tuple[float, float]],
    supports: list[float],
    darkness: list[float],
    search: BandSearch,
    pitch: float,
    margin: float,
) -> None:
    """Search each weakly supported inner line again, one true pitch from a supported neighbour.

    Even positions between the outer lines are off where one gap is much wider than the rest: the
    centre gap parting a half-cut module's halves pushes the lines beyond it out of their search
    window. Adjacent supported lines give the true pitch; a weak line found with more support one
    such pitch from its neighbour replaces the first try, within CHAIN_REACH of a pitch of its even
    position. A grid of one cell too many or too few must not walk its lines onto the real gaps
    this way until it looks supported: its true pitch differs from the even one by 1/count (one wide
    gap: under 1.5 %), and the lines it moves squeeze the lines left between them (a wide gap only
    widens one step), so either undoes the search. Updates the three lists in place.
    """
    count = len(lines) - 1
    middle = float(np.mean(search.centres))
    found, support_of, dark_of = list(lines), list(supports), list(darkness)

    def at_middle(k: int) -> float:
        return found[k][0] + found[k][1] * middle

    def strong(k: int) -> bool:
        return 0 < k < count and support_of[k - 1] >= MIN_CONFIDENCE

    steps = [at_middle(k + 1) - at_middle(k) for k in range(1, count - 1) if strong(k) and strong(k + 1)]
    if not steps:
        return
    true_pitch = float(np.median(steps))
    if abs(true_pitch / pitch - 1.0) > 0.5 / count:
        return
    moved: set[int] = set()
    changed = True
    while changed:  # each pass makes at least one more line strong, or ends
        changed = False
        for k in range(1, count):
            guesses = [at_middle(j) + (k - j) * true_pitch for j in (k - 1, k + 1) if strong(j)]
            if strong(k) or not guesses:
                continue
            expected = float(np.mean(guesses))
            if abs(expected - (margin + k * pitch)) > CHAIN_REACH * pitch:
                continue
            line, support, dark = search.line_near(expected, pitch)
            if support > support_of[k - 1]:
                found[k], support_of[k - 1], dark_of[k - 1] = line, support, dark
                moved.add(k)
                changed = changed or strong(k)
    squeezed = any(
        at_middle(b) - at_middle(a) < MIN_CHAINED_STEP * true_pitch
        for k in moved
        for a, b in ((k - 1, k), (k, k + 1))
    )
    if not squeezed:
        lines[:], supports[:], darkness[:] = found, support_of, dark_of


def hidden_support(
    strengths: list[np.ndarray],
    references: np.ndarray,
    centres: np.ndarray,
    lines: list[tuple[float, float]],
    pitch: float,
) -> float:
    """How well the extra lines of a 2x or 3x finer grid are supported, the finer grid that fits best.

    Each extra line is searched and judged exactly as a configured one (clear, as dark as this band's
    gaps, on a straight line), in a window narrowed to its finer pitch around where it would lie between
    the found lines (not the even positions: a half-cut module's wider centre gap moves the half-gaps
    around it by about that window). Busbars sit inside cells too, but are fainter than the gaps, so a
    right grid scores low here; a grid too coarse scores as high as on its own lines. Needs count >= 2:
    the band's gap darkness is the yardstick.
    """
    best = 0.0
    stacked = np.asarray(strengths)
    for parts in SUBDIVISIONS:
        fine = pitch / parts
        window = max(2, round(SEARCH_FRACTION * fine))
        supports = []
        for (first, first_slope), (second, second_slope) in itertools.pairwise(lines):
            for j in range(1, parts):
                share = j / parts
                offset = first + share * (second - first)
                slope = first_slope + share * (second_slope - first_slope)
                expected = offset + slope * np.asarray(centres)
                found = valleys_along(stacked, expected, window)
                _, support = fit_line(centres, found, float(np.mean(expected)), fine, references)
                supports.append(support)
        best = max(best, float(np.mean(supports)))
    return best


def steady_edges(lines: list[tuple[float, float]]) -> tuple[tuple[float, float], tuple[float, float]]:
    """Outer lines averaged with one median inner pitch beyond the outermost inner lines.

    A cell's glow ramps up over its first few pixels, so the steepest step lies a little inside the
    true edge; the inner gaps have no such bias, and averaging halves the step's bias.
    """
    offsets = np.array([offset for offset, _ in lines[1:-1]])
    pitch = float(np.median(np.diff(offsets)))
    first, last = lines[1], lines[-2]
    left = ((lines[0][0] + first[0] - pitch) / 2, (lines[0][1] + first[1]) / 2)
    right = ((lines[-1][0] + last[0] + pitch) / 2, (lines[-1][1] + last[1]) / 2)
    return left, right


def gap_reference(strength: np.ndarray, gaps: int) -> float:
    """How dark this band's gaps should be: the median of its `gaps` strongest valleys.

    If the configured grid is right, its gaps are the darkest lines across the band and each found
    gap is close to this; a wrong grid lands its lines on busbars, about half as dark.
    """
    if gaps < 1 or len(strength) < 3:
        return 0.0
    middle = strength[1:-1]
    peaks = middle[(middle >= strength[:-2]) & (middle > strength[2:])]
    if len(peaks) == 0:
        return 0.0
    return float(np.median(np.sort(peaks)[-gaps:]))


def steepest_steps(
    profiles: list[np.ndarray], expected: float, window: int, rising: bool
) -> list[tuple[float, float]]:
    """Per band: sub-pixel position and relative height of the steepest step into the cells near
    `expected`."""
    gradients = np.stack(
        [np.gradient(profile) / max(float(np.percentile(profile, 90)), 8.0) for profile in profiles]
    )
    return band_valleys(gradients if rising else -gradients, expected, window)


def valleys_along(strengths: np.ndarray, expected: np.ndarray, window: int) -> list[tuple[float, float]]:
    """`band_valleys` with each band's own expected position (a line that may tilt across the bands)."""
    bands, length = strengths.shape
    rows = np.arange(bands)
    candidates = np.rint(expected).astype(np.int64)[:, None] + np.arange(-window, window + 1)[None, :]
    inside = (candidates >= 1) & (candidates <= length - 2)
    prior = 1.0 - 0.3 * ((candidates - expected[:, None]) / window) ** 2
    weighted = np.where(inside, strengths[rows[:, None], np.clip(candidates, 1, length - 2)] * prior, -np.inf)
    at = np.clip(candidates[rows, np.argmax(weighted, axis=1)], 1, length - 2)
    positions, centre = refined_valleys(strengths, at)
    searched = inside.any(axis=1)  # a window off the profile finds nothing, as in band_valleys
    positions, centre = np.where(searched, positions, expected), np.where(searched, centre, 0.0)
    return [(float(x), float(c)) for x, c in zip(positions, centre, strict=True)]


def band_valleys(strengths: np.ndarray, expected: float, window: int) -> list[tuple[float, float]]:
    """Per band (a row of `strengths`, all of one length): sub-pixel position and strength of the
    strongest valley within +-window of `expected`."""
    bands, length = strengths.shape
    lo = max(1, round(expected) - window)
    hi = min(length - 1, round(expected) + window + 1)
    if hi <= lo:
        return [(expected, 0.0)] * bands
    offsets = np.arange(lo, hi) - expected
    # A mild pull towards the even position: a busbar as dark as the gap loses to the gap.
    prior = 1.0 - 0.3 * (offsets / window) ** 2
    at = np.argmax(strengths[:, lo:hi] * prior[None, :], axis=1) + lo
    positions, centre = refined_valleys(strengths, at)
    return [(float(x), float(c)) for x, c in zip(positions, centre, strict=True)]


def refined_valleys(strengths: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each band's valley at column `at` (1 .. length-2): its sub-pixel position, from a parabola through
    it and its neighbours, and its strength."""
    rows = np.arange(len(at))
    left, centre, right = strengths[rows, at - 1], strengths[rows, at], strengths[rows, at + 1]
    curvature = left - 2 * centre + right
    peaked = curvature < -1e-9
    shift = np.where(peaked, 0.5 * (left - right) / np.where(peaked, curvature, -1.0), 0.0)
    return at + np.clip(shift, -0.5, 0.5), centre


def fit_line(
    centres: np.ndarray,
    found: list[tuple[float, float]],
    expected: float,
    pitch: float,
    references: np.ndarray | None = None,
) -> tuple[tuple[float, float], float]:
    """A straight line through the bands' valley positions; weak valleys and outliers are dropped."""
    at = np.asarray(centres, dtype=np.float64)
    positions = np.array([p for p, _ in found])
    strengths = np.array([s for _, s in found])
    keep = strengths >= MIN_VALLEY_CONTRAST
    if not keep.any():
        return (expected, 0.0), 0.0
    offset, slope = robust_line(at[keep], positions[keep], strengths[keep], FIT_TOLERANCE * pitch)
    residual = np.abs(positions - (offset + slope * at))
    # Support counts only clear gaps: busbars, cracks and noise make fainter valleys anywhere.
    clear = strengths >= GAP_CONTRAST
    if references is not None:
        clear &= strengths >= GAP_RELATIVE * references
    support = float((clear & (residual <= LINE_TOLERANCE * pitch)).mean())
    return (float(offset), float(slope)), support


def robust_line(
    at: np.ndarray, positions: np.ndarray, weights: np.ndarray, tolerance: float
) -> tuple[float, float]:
    """(offset, slope) of position = offset + slope * at, agreeing with most of the (weighted) points.

    Every line through two points (and every level line through one) is tried, the one with the most
    weight within `tolerance` wins, then least squares on its inliers. A band whose darkest valley is
    a crack or a busbar is an outlier this drops, where a first least-squares fit would tilt towards it.
    """
    first, second = np.triu_indices(len(at), k=1)
    distinct = at[second] != at[first]
    first, second = first[distinct], second[distinct]
    pair_slopes = (positions[second] - positions[first]) / (at[second] - at[first])
    slopes = np.concatenate([np.zeros(len(positions)), pair_slopes])
    offsets = np.concatenate([positions, positions[first] - pair_slopes * at[first]])
    # Perspective is already corrected: only a slight tilt is believable.
    believable = np.abs(slopes) <= MAX_LINE_SLOPE
    slopes, offsets = slopes[believable], offsets[believable]
    if not len(slopes):
        return float(np.median(positions)), 0.0
    residuals = np.abs(positions[None, :] - (offsets[:, None] + slopes[:, None] * at[None, :]))
    scores = ((residuals <= tolerance) * weights[None, :]).sum(axis=1)
    best = int(np.argmax(scores))
    offset, slope = float(offsets[best]), float(slopes[best])
    inliers = np.abs(positions - (offset + slope * at)) <= tolerance
    if inliers.sum() >= 3:
        slope, offset = (float(v) for v in np.polyfit(at[inliers], positions[inliers], 1, w=weights[inliers]))
        slope = float(np.clip(slope, -MAX_LINE_SLOPE, MAX_LINE_SLOPE))
        offset = float(np.average(positions[inliers] - slope * at[inliers], weights=weights[inliers]))
    return offset, slope


Line = tuple[float, float]  # (offset, slope) in the rectified module: x = offset + slope * y
GapSide = Literal["both", "before", "after"]  # where the cells lie around a line: its inner / last / first


def gap_edges(
    grey: np.ndarray,
    from_rect: np.ndarray,
    lines: list[Line],
    across: int,
    pitches: tuple[float, float],
    margins: tuple[float, float],
    native: float,
    transposed: bool,
) -> list[tuple[Line, Line]]:
    """Each cell's (start, end) lines along one axis: the gap lines moved out to the gaps' edges.

    The rectified image is too coarse for a gap a few frame pixels wide, so each line's profile across
    it is sampled from the frame itself, every EDGE_STEP frame pixels, as the median over the middle of
    every band (a crack or a dark cell in one band does not move it). A cell's edge is where the
    profile has climbed EDGE_LEVEL of the way from the gap's floor to that cell's own level: low,
    because EL cells darken over their last few pixels and that rim belongs to the cell.
    `native` is frame pixels per rectified pixel across the lines; pass the horizontal lines with
    `transposed` (their offsets are y).
    """
    pitch, pitch_across = pitches
    along = _band_samples(across, pitch_across, margins[1])
    edges = []
    for k, (offset, slope) in enumerate(lines):
        side: GapSide = "both" if 0 < k < len(lines) - 1 else ("after" if k == 0 else "before")
        sampled = LineSamples(grey, from_rect, (offset, slope), along, transposed)
        before, after = gap_sides(sampled, side, EDGE_WINDOW * pitch, MAX_EDGE_WINDOW * pitch, native)
        edges.append(((offset + before, slope), (offset + after, slope)))
    return [(edges[k][1], edges[k + 1][0]) for k in range(len(lines) - 1)]


def gap_sides(
    sampled: LineSamples, side: GapSide, window: float, widest: float, native: float
) -> tuple[float, float]:
    """(before, after) edges of one line's gap, read in a window doubled up to `widest` until it
    holds the whole gap; a gap no window holds (a faint one) keeps the first window's reading.

    Only gaps between cells widen: beyond the outer lines lie the module's frame and the
    background, whose own steps a wide window would take for the cells' edge.
    """
    profile, offsets = sampled.profile(window, native)
    first = profile_edges(profile, offsets, side)
    if side != "both":
        return first
    edges = first
    while not gap_fits(profile, offsets, edges):
        if window >= widest:
            return first
        window = min(2 * window, widest)
        profile, offsets = sampled.profile(window, native)
        edges = profile_edges(profile, offsets, side)
    return edges


@dataclass(frozen=True)
class LineSamples:
    """Where one line (rectified coordinates) runs through the frame, to read profiles across it."""

    grey: np.ndarray
    from_rect: np.ndarray
    line: Line
    along: np.ndarray  # positions along the line to sample at
    transposed: bool  # a horizontal line: its offsets are y

    def profile(self, window: float, native: float) -> tuple[np.ndarray, np.ndarray]:
        """The median profile across the line within +- `window` (rectified pixels), and its offsets."""
        # EDGE_STEP frame pixels apart, but at least 8 samples each side (a small module still has a
        # floor and both cells' levels to read) and at most 2048 (a huge one stays bounded)
        count = int(np.clip(round(window * native / EDGE_STEP), 8, 2048))
        offsets = np.linspace(-window, window, 2 * count + 1)
        offset, slope = self.line
        position = offset + slope * self.along  # the line's offset at each sample along it
        rect_a = position[None, :] + offsets[:, None]  # (offsets, samples) across the line
        rect_b = np.broadcast_to(self.along[None, :], rect_a.shape)
        points = np.stack([rect_b, rect_a] if self.transposed else [rect_a, rect_b], axis=-1)
        in_frame = cv2.perspectiveTransform(points.reshape(-1, 1, 2), self.from_rect).reshape(
            *rect_a.shape, 2
        )
        levels = cv2.remap(
            self.grey,
            in_frame[..., 0].astype(np.float32),
            in_frame[..., 1].astype(np.float32),
            cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        return np.median(levels.astype(np.float32), axis=1), offsets


def gap_fits(profile: np.ndarray, offsets: np.ndarray, edges: tuple[float, float]) -> bool:
    """Did the window hold the whole gap between two cells: both cells in view, both edges in its
    inner half?

    The cells' level is read in the window's outer part. Where that part is no brighter than the
    floor (the gap fills the window and reads as faint), still holds some of the floor (the gap
    reaches into it), or an edge lies out there, the window is narrower than the gap.
    """
    reach = 0.5 * float(offsets[-1])
    floor = float(profile[np.abs(offsets) <= reach].min())
    outer = np.abs(offsets) >= 0.6 * offsets[-1]
    for cells in (outer & (offsets < 0), outer & (offsets > 0)):
        level = float(np.median(profile[cells]))
        if level - floor < MIN_EDGE_CONTRAST * max(level, 8.0):
            return False
        if float(profile[cells].min()) - floor < 0.5 * (level - floor):
            return False
    before, after = edges
    return -reach < before < 0.0 < after < reach


def _band_samples(across: int, pitch_across: float, margin_across: float) -> np.ndarray:
    """Positions along a line, EDGE_SAMPLES per band, in the middle 70% of each band (off the crossings)."""
    fractions = np.linspace(0.15, 0.85, EDGE_SAMPLES)
    bands = np.arange(across)[:, None]
    return (margin_across + (bands + fractions[None, :]) * pitch_across).reshape(-1)


def profile_edges(profile: np.ndarray, offsets: np.ndarray, side: GapSide) -> tuple[float, float]:
    """(before, after): where the cells on either side of a gap end, as offsets from the line.

    `side` is "both" for a gap between cells, "after" for the module's first line (cells only after
    it), "before" for its last. An edge that cannot be told from the profile stays on the line.
    """
    middle = np.abs(offsets) <= 0.5 * offsets[-1]
    outer = np.abs(offsets) >= 0.6 * offsets[-1]
    if side == "both":
        floor_at = int(np.flatnonzero(middle)[np.argmin(profile[middle])])
    else:
        # outside the module the floor is whatever is darkest out there: the frame, the backsheet
        outside = (offsets <= 0.25 * offsets[-1]) if side == "after" else (offsets >= -0.25 * offsets[-1])
        floor_at = int(np.flatnonzero(outside)[np.argmin(profile[outside])])
    floor = float(profile[floor_at])
    before = after = 0.0
    if side in ("both", "before"):
        before = _climb(
            profile, offsets, floor, float(np.median(profile[outer & (offsets < 0)])), floor_at, -1
        )
    if side in ("both", "after"):
        after = _climb(profile, offsets, floor, float(np.median(profile[outer & (offsets > 0)])), floor_at, 1)
    return before, after


def _climb(
    profile: np.ndarray, offsets: np.ndarray, floor: float, cell: float, start: int, step: int
) -> float:
    """The offset, walking from `start` in direction `step`, where the profile first reaches the edge
    level between `floor` and `cell` (linear between samples); 0.0 if the gap is too faint to tell."""
    if cell - floor < MIN_EDGE_CONTRAST * max(cell, 8.0):
        return 0.0
    level = floor + EDGE_LEVEL * (cell - floor)
    i = start
    while 0 <= i + step < len(profile) and profile[i + step] < level:
        i += step
    j = i + step
    if not 0 <= j < len(profile):
        return 0.0
    rise = float(profile[j] - profile[i])
    fraction = (level - float(profile[i])) / rise if rise > 1e-9 else 0.0
    return float(offsets[i] + fraction * (offsets[j] - offsets[i]))


def lattice_corners(
    x_axis: AxisGrid,
    y_axis: AxisGrid,
    to_rect: np.ndarray,
    outline: np.ndarray,
    pitches: tuple[float, float],
    margins: tuple[float, float],
) -> np.ndarray | None:
    """The module's outer corners in the frame as its well-supported inner gap lines place them, or
    None with fewer than two such lines on either axis.

    A notched outline (dark cells at the module's edge, outside the located bright region) skews the
    rectification; the crossings of the lines that clearly lie on gaps, mapped to where an even grid
    puts them, give the module's true projection, and the outline follows from it. Even positions are
    an approximation (a half-cut module's wider centre gap shifts the lines beyond it by a few percent
    of a pitch); the second pass finds the lines and edges again from the image. `outline` is the
    module's outer corners in the rectified image, where `to_rect` maps the located outline.
    """
    cols, rows = len(x_axis.lines) - 1, len(y_axis.lines) - 1
    (pitch_x, pitch_y), (margin_x, margin_y) = pitches, margins
    vertical = [(k, x_axis.lines[k]) for k in range(1, cols) if x_axis.support[k - 1] >= MIN_CONFIDENCE]
    horizontal = [(k, y_axis.lines[k]) for k in range(1, rows) if y_axis.support[k - 1] >= MIN_CONFIDENCE]
    if len(vertical) < 2 or len(horizontal) < 2:
        return None
    found = np.array([crossing(v, h) for _, v in vertical for _, h in horizontal], np.float32)
    even = np.array(
        [(margin_x + i * pitch_x, margin_y + j * pitch_y) for i, _ in vertical for j, _ in horizontal],
        np.float32,
    )
    to_even, _ = cv2.findHomography(found, even, 0)
    if to_even is None:
        return None
    from_even = np.linalg.inv(to_even @ to_rect)
    return cv2.perspectiveTransform(outline.reshape(-1, 1, 2), from_even).reshape(4, 2).astype(np.float32)


def lattice_holds_outline(
    lattice: np.ndarray, located: np.ndarray, grid: tuple[int, int], frame_shape: tuple[int, ...]
) -> bool:
    """Whether an outline taken from the grid (`lattice_corners`) may replace the located one: it lies
    in the frame, and the located outline lies within it, each corner at most LATTICE_OUTSIDE of a
    pitch outside and LATTICE_INSIDE inside.

    A notch (dark edge cells) only ever makes the located outline smaller than the module. A located
    outline reaching a pitch beyond the lattice means the grid is short of a row or column (a line
    configured with one too few), whose even lattice the second pass would find clean, evenly cut and
    wrong; one far inside it means the lattice was extrapolated from too few lines.
    """
    rows, cols = grid
    height, width = frame_shape[:2]
    if not np.all(np.isfinite(lattice)):
        return False
    if (
        lattice[:, 0].min() < -1
        or lattice[:, 1].min() < -1
        or lattice[:, 0].max() > width
        or lattice[:, 1].max() > height
    ):
        return False  # the module would reach out of the frame: it is cut off, not notched
    in_pitches = np.array([[0, 0], [cols, 0], [cols, rows], [0, rows]], np.float32)
    to_pitches = cv2.getPerspectiveTransform(lattice.astype(np.float32), in_pitches)
    mapped = cv2.perspectiveTransform(located.reshape(-1, 1, 2).astype(np.float32), to_pitches).reshape(4, 2)
    # how far each located corner lies inside the lattice's corner, in pitches along each axis
    inward = np.where(in_pitches == 0, mapped, in_pitches - mapped)
    return bool(np.all(inward >= -LATTICE_OUTSIDE) and np.all(inward <= LATTICE_INSIDE))


def cell_side_spread(
    x_bounds: list[tuple[Line, Line]],
    y_bounds: list[tuple[Line, Line]],
    grid: tuple[int, int],
    pitches: tuple[float, float],
    margins: tuple[float, float],
) -> float:
    """How far the cut cells are from being all of one size: the largest difference of a cell's width
    (height) from the median, as a fraction of the pitch along that axis, so a half cell's short side
    is held to its own length. The widths are measured where the vertical lines meet the module's top
    and bottom edges, the heights where the horizontal ones meet its left and right edges."""
    (rows, cols), (pitch_x, pitch_y), (margin_x, margin_y) = grid, pitches, margins
    widths = side_spread(x_bounds, (margin_y, margin_y + rows * pitch_y)) / pitch_x
    heights = side_spread(y_bounds, (margin_x, margin_x + cols * pitch_x)) / pitch_y
    return max(widths, heights)


def side_spread(bounds: list[tuple[Line, Line]], ends: tuple[float, float]) -> float:
    """The largest difference of a cell's side from the median side (rectified pixels), measured at
    both ends of the lines (`ends`: where they cross the module's outer edges), so a line tilted
    against its neighbours counts as well as one misplaced."""
    spread = 0.0
    for at in ends:
        sides = np.array([(end[0] + end[1] * at) - (start[0] + start[1] * at) for start, end in bounds])
        spread = max(spread, float(np.max(np.abs(sides - np.median(sides)))))
    return spread


def crossing(vertical: Line, horizontal: Line) -> tuple[float, float]:
    """Where x = a + b*y meets y = c + d*x."""
    a, b = vertical
    c, d = horizontal
    x = (a + b * c) / (1.0 - b * d)
    return x, c + d * x


def cut_cells(
    grey: np.ndarray,
    from_rect: np.ndarray,
    x_bounds: list[tuple[Line, Line]],
    y_bounds: list[tuple[Line, Line]],
    cell_size: int,
) -> list[CellCut]:
    """Each cell's quadrilateral (between its start and end lines on both axes) mapped to the frame and
    resampled once from the frame's own pixels."""
    cells = []
    for r, (top, bottom) in enumerate(y_bounds):
        for c, (left, right) in enumerate(x_bounds):
            corners = np.array(
                [crossing(left, top), crossing(right, top), crossing(right, bottom), crossing(left, bottom)]
            )
            in_frame = cv2.perspectiveTransform(corners.reshape(-1, 1, 2), from_rect)
            polygon = in_frame.reshape(4, 2).astype(np.float32)
            cells.append(CellCut(r, c, cell_views(grey, polygon, cell_size), polygon))
    return cells


def outline_sides(polygon: np.ndarray) -> tuple[float, float]:
    """(width, height) of a cell outline (clockwise from top-left): the mean of its opposite sides."""
    p = np.asarray(polygon, dtype=np.float64)
    width = (np.hypot(*(p[1] - p[0])) + np.hypot(*(p[2] - p[3]))) / 2
    height = (np.hypot(*(p[3] - p[0])) + np.hypot(*(p[2] - p[1]))) / 2
    return float(width), float(height)


def cell_views(grey: np.ndarray, polygon: np.ndarray, cell_size: int) -> np.ndarray:
    """(V, cell_size, cell_size) uint8: what the model judges of the cell inside `polygon`.

    A whole cell is one view (`resample_quad` to a square). A half cell of a half-cut module is
    resampled keeping its proportions and judged as two mirrored squares
    (model.preprocess.half_cell_views): stretched to a square it would look defective to a network that
    learned whole cells. Serving, the shadow model, the heat map and the reviewed-cell export all cut
    through `cell_picture`, so they see the same pixels.
    """
    return picture_views(cell_picture(grey, polygon, cell_size), cell_size)


def cell_picture(grey: np.ndarray, polygon: np.ndarray, cell_size: int) -> np.ndarray:
    """The cell inside `polygon` at the model's scale in its own proportions: a whole cell
    cell_size x cell_size, a half cell model.preprocess.half_cell_shape (what the export stores)."""
    width, height = outline_sides(polygon)
    if not is_half_cell(width, height):
        return resample_quad(grey, polygon, cell_size, cell_size)
    rows, cols = half_cell_shape(width, height, cell_size)
    return resample_quad(grey, polygon, cols, rows)


def resample_quad(grey: np.ndarray, polygon: np.ndarray, width: int, height: int) -> np.ndarray:
    """The quadrilateral `polygon` of `grey` as a width x height image.

    A cell much larger in the frame than that is warped at its own size first and then shrunk with
    area interpolation (resize_to), so thin cracks are not lost to aliasing.
    """
    along, across = outline_sides(polygon)
    if along > 1.5 * width or across > 1.5 * height:
        out_w, out_h = max(width, round(along)), max(height, round(across))
    else:
        out_w, out_h = width, height
    # Pixel edges, not centres: the polygon's corners are the outer corners of the output's pixels.
    target = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], dtype=np.float32) - 0.5
    warp = cv2.getPerspectiveTransform(np.asarray(polygon, dtype=np.float32), target)
    cell = cv2.warpPerspective(
        grey, warp, (out_w, out_h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    return resize_to(cell, height, width)


def stored_cell_picture(
    grey: np.ndarray, polygon: np.ndarray | list[list[float]], cell_size: int, whole_frame: bool
) -> np.ndarray:
    """A stored cell cut again from its stored frame as the pipeline cut it (`cell_picture`): a cell
    inspection's whole frame (model.preprocess.image_picture), else the cell inside its polygon. The
    shadow model, the heat map and the reviewed-cell export all re-cut through here."""
    if whole_frame:
        return image_picture(grey, cell_size)
    return cell_picture(grey, np.asarray(polygon, dtype=np.float32), cell_size)


def stored_cell_views(
    grey: np.ndarray, polygon: np.ndarray | list[list[float]], cell_size: int, whole_frame: bool
) -> np.ndarray:
    """(V, cell_size, cell_size): what the model judged of a stored cell (`stored_cell_picture`'s
    views), for the shadow model and the heat map."""
    return picture_views(stored_cell_picture(grey, polygon, cell_size, whole_frame), cell_size)
