"""Decoding posted bytes to 8-bit grey: valid layouts of each format decode alike."""

from __future__ import annotations

import numpy as np

from serving.images import ImageType, decode_image
from tests.serving.helpers import png, tiff

MAX_PIXELS = 10_000_000


def test_planar_rgb_tiff_decodes_like_the_same_colours_elsewhere() -> None:
    rgb = np.zeros((64, 48, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50  # red, green, blue
    planar = tiff(np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate")  # (3, H, W)
    contiguous = tiff(rgb, photometric="rgb", planarconfig="contig")
    from_planar = decode_image(planar, ImageType.TIFF, MAX_PIXELS)
    assert (from_planar.width, from_planar.height) == (48, 64)
    assert from_planar.grey.shape == (64, 48)
    np.testing.assert_array_equal(from_planar.grey, decode_image(contiguous, ImageType.TIFF, MAX_PIXELS).grey)
    # the same colours as a PNG (cv2 keeps them blue, green, red): one luma, 0.299 R + 0.587 G + 0.114 B
    from_png = decode_image(png(rgb[..., ::-1]), ImageType.PNG, MAX_PIXELS)
    np.testing.assert_array_equal(from_planar.grey, from_png.grey)
    assert int(from_planar.grey[0, 0]) == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
