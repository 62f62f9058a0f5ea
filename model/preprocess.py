"""Preprocessing that training and serving share: any camera image to the model's grey input.

Owns: conversion of 8/16-bit grey or colour arrays to 8-bit grey, resizing to the card's input size,
the two mirrored squares a half cell is judged as (and the rule that combines their probabilities),
and the 8 dihedral views used for augmentation and test-time averaging. Normalisation (mean/std) is not
here: it is baked into the exported graph (model/network.py), so serving cannot get it wrong.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

INPUT_SIZE = 300
# An outline at least this much longer than wide is a half cell (120/144-cell half-cut modules): the
# geometric middle between a whole cell's 1 and a half cell's 2.
HALF_CELL_ASPECT = math.sqrt(2)


class ImageFormatError(ValueError):
    """An image whose bit depth or channel count cannot be converted to 8-bit grey."""


def to_grey_u8(image: np.ndarray) -> np.ndarray:
    """8-bit grey from 8/16-bit grey, RGB or RGBA; 16-bit frames are scaled by their own range.

    EL cameras deliver 12-16 bit frames whose useful signal rarely fills the range, so a fixed shift
    would leave them nearly black: stretch between the 0.5 and 99.5 percentiles instead.
    """
    import cv2

    if image.ndim == 3:
        channels = image.shape[2]
        if channels == 1:
            image = image[:, :, 0]
        elif channels in (3, 4):
            code = cv2.COLOR_BGR2GRAY if channels == 3 else cv2.COLOR_BGRA2GRAY
            image = cv2.cvtColor(np.ascontiguousarray(image), code)
        else:
            raise ImageFormatError(f"expected 1, 3 or 4 channels, got {channels}")
    elif image.ndim != 2:
        raise ImageFormatError(f"expected a 2-D grey or 3-D colour image, got {image.ndim} dimensions")
    if image.dtype == np.uint8:
        return image
    if image.dtype in (np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64):
        return _stretch_to_u8(image)
    raise ImageFormatError(f"expected 8- or 16-bit pixels, got {image.dtype}")


STRETCH_SAMPLE_PIXELS = 1_000_000  # the percentiles are read on at most about this many pixels
# pixels exactly at the frame's maximum, as a share of it, that read as saturated (hot pixels, a
# reflection); more than the upper bound is a plateau of the picture itself (bright cells of a frame
# that was 8-bit before it was 16), which sets the top of the range as it should
SATURATED_SHARE = (0.0005, 0.05)
STRETCH_ROWS = 256  # rows converted at a time: float copies of a whole 60 MP frame took over 1 GB


def _stretch_to_u8(image: np.ndarray) -> np.ndarray:
    """Grey levels between the 0.5 and 99.5 percentiles mapped onto 0..255, a band of rows at a time.

    The percentiles come from an evenly strided sample (every pixel up to 1 MP), leaving out pixels
    at the sensor's ceiling: a camera's saturated or hot pixels, which beyond 0.5 % of the frame would
    otherwise set the top of the range and crush the module into a few grey levels.
    """
    step = max(1, int(np.ceil(np.sqrt(image.size / STRETCH_SAMPLE_PIXELS))))
    sample = image[::step, ::step].astype(np.float32).reshape(-1)
    if sample.size:
        # the sensor's ceiling: 12- and 14-bit cameras saturate at 4095 or 16383 inside uint16, so it
        # is read off the frame (a share of pixels exactly at its maximum), not off the type
        top = float(sample.max())
        at_top = np.count_nonzero(sample == top) / sample.size
        if SATURATED_SHARE[0] <= at_top <= SATURATED_SHARE[1]:
            below = sample[sample < top]
            sample = below if below.size else sample
    if not sample.size:
        return np.zeros(image.shape, dtype=np.uint8)
    low, high = (float(v) for v in np.percentile(sample, (0.5, 99.5)))
    if high <= low:
        return np.zeros(image.shape, dtype=np.uint8)
    scale = 255.0 / (high - low)
    out = np.empty(image.shape, dtype=np.uint8)
    for start in range(0, image.shape[0], STRETCH_ROWS):
        band = image[start : start + STRETCH_ROWS].astype(np.float32)
        np.subtract(band, low, out=band)
        np.multiply(band, scale, out=band)
        np.clip(band, 0, 255, out=band)
        out[start : start + STRETCH_ROWS] = band
    return out


def resize_to(grey: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """A grey image at rows x cols; area interpolation when shrinking keeps thin cracks visible."""
    import cv2

    if grey.shape == (rows, cols):
        return grey
    shrinking = grey.shape[0] > rows or grey.shape[1] > cols
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(grey, (cols, rows), interpolation=interpolation)


def resize_cell(cell: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """A grey cell at size x size (`resize_to`)."""
    return resize_to(cell, size, size)


def is_half_cell(width: float, height: float) -> bool:
    """Whether a cell of this width and height (any unit) is a half cell rather than a whole one."""
    short, long = sorted((width, height))
    return short > 0 and long / short >= HALF_CELL_ASPECT


def half_cell_shape(width: float, height: float, size: int = INPUT_SIZE) -> tuple[int, int]:
    """(rows, cols) a half cell is resampled to before it is mirrored: its long side `size` pixels, its
    short side half of that (rounded up), so the cell keeps its own proportions."""
    short = (size + 1) // 2
    return (short, size) if width >= height else (size, short)


def half_cell_views(half: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """(2, size, size): a half cell (`half_cell_shape`) beside its mirror image across each long side.

    The network learned whole cells. Stretched to a square, a half cell is a different picture: with
    pvqc-cell 1.2.2, 9.4 % of the halves of good validation cells were judged defective, against 2.5 %
    of good whole cells. Mirrored across the laser cut, a half reads as a whole cell again. Which long
    side is the cut cannot be told from the grid, so both mirrors are judged and the cell takes the lower
    probability (`cell_probabilities`): then 2.5 % of good halves are flagged, as of good whole cells,
    and 80 % of defective validation cells have a half flagged (whole cells: 74 %).
    """
    if half.shape[0] > half.shape[1]:  # a tall half: mirror across its right, then its left side
        return half_cell_views(half.T, size).transpose(0, 2, 1)
    rows = half.shape[0]
    extra = size - rows  # rows the mirror adds: all of them for an even size, one fewer for an odd
    if half.shape != (rows, size) or not 0 < extra <= rows:
        raise ValueError(f"expected a half cell of {half_cell_shape(2, 1, size)} pixels, got {half.shape}")
    flipped = half[::-1]
    across_bottom = np.vstack([half, flipped[:extra]])
    across_top = np.vstack([flipped[rows - extra :], half])
    return np.stack([across_bottom, across_top])


def image_picture(grey: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """A cut-out cell image at the model's scale in its own proportions: a whole cell size x size, a
    half cell `half_cell_shape` (what the reviewed-cell export stores)."""
    height, width = grey.shape
    if not is_half_cell(width, height):
        return resize_cell(grey, size)
    return resize_to(grey, *half_cell_shape(width, height, size))


def picture_views(picture: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """(V, size, size): the views the model judges of an `image_picture` (a whole cell: itself)."""
    if picture.shape == (size, size):
        return picture[None]
    return half_cell_views(picture, size)


def image_views(grey: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """(V, size, size) uint8: what the model judges for a whole cut-out cell image, V = 1 for a whole
    cell and 2 for a half cell (`half_cell_views`)."""
    return picture_views(image_picture(grey, size), size)


def flatten_views(views: Sequence[np.ndarray]) -> tuple[np.ndarray, list[int]]:
    """All cells' views in one (N, S, S) stack, and how many each cell has (for `cell_probabilities`)."""
    return np.concatenate(list(views)), [len(v) for v in views]


def cell_probabilities(view_probabilities: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Each cell's probability from its views' (in `flatten_views` order): the lowest of them.

    The lowest, because each extra view of a half cell is a guess at which side is the cut (see
    `half_cell_views`); a defect shows in both mirrors, the wrong guess's artificial edge only in one.
    NaN stays NaN, so a broken model output is still refused downstream.
    """
    values = np.asarray(view_probabilities, dtype=float).reshape(-1)
    if sum(counts) != len(values) or any(c < 1 for c in counts):
        raise ValueError(
            f"expected {sum(counts)} view probabilities for {len(counts)} cells, got {len(values)}"
        )
    return lowest_per_cell(values, np.repeat(np.arange(len(counts)), counts), len(counts))


def lowest_per_cell(probabilities: np.ndarray, cells_of: np.ndarray, cells: int) -> np.ndarray:
    """The lowest probability of each of `cells` cells, entry i belonging to cell `cells_of[i]`: how a
    half cell's views combine, in serving (`cell_probabilities`) and in evaluation (reviewed sets)."""
    out = np.full(cells, np.inf)
    with np.errstate(invalid="ignore"):  # NaN stays NaN, meant: a broken model output is refused later
        np.minimum.at(out, cells_of, np.asarray(probabilities, dtype=float))
    return out


def cells_to_batch(cells: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """(N, 1, H, W) float32 with raw grey levels 0..255, the exported graph's input."""
    batch = np.asarray(cells, dtype=np.float32)
    return batch[:, None, :, :]


def dihedral_view(images: np.ndarray, view: int) -> np.ndarray:
    """One of the 8 symmetries of the square on the last two axes (view 0 is the identity)."""
    if not 0 <= view < 8:
        raise ValueError(f"expected a dihedral view in 0..7, got {view}")
    rotated = np.rot90(images, k=view % 4, axes=(-2, -1))
    if view >= 4:
        rotated = np.flip(rotated, axis=-1)
    return np.ascontiguousarray(rotated)
