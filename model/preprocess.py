"""Preprocessing that training and serving share: any camera image to the model's grey input.

Owns: conversion of 8/16-bit grey or colour arrays to 8-bit grey, resizing to the card's input size,
and the 8 dihedral views used for augmentation and test-time averaging. Normalisation (mean/std) is not
here: it is baked into the exported graph (model/network.py), so serving cannot get it wrong.
"""

from __future__ import annotations

import numpy as np

INPUT_SIZE = 300


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
        values = image.astype(np.float32)
        low, high = np.percentile(values, (0.5, 99.5))
        if high <= low:
            return np.zeros(image.shape, dtype=np.uint8)
        scaled = (values - low) * (255.0 / (high - low))
        return np.clip(scaled, 0, 255).astype(np.uint8)
    raise ImageFormatError(f"expected 8- or 16-bit pixels, got {image.dtype}")


def resize_cell(cell: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """A grey cell at size x size; area interpolation when shrinking keeps thin cracks visible."""
    import cv2

    if cell.shape == (size, size):
        return cell
    shrinking = cell.shape[0] > size or cell.shape[1] > size
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(cell, (size, size), interpolation=interpolation)


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
