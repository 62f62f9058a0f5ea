"""Decoding posted image bytes into 8-bit grey, with the guards a public endpoint needs.

Owns: which content types are accepted, the check that the bytes are what the content type says,
the decompression-bomb guard (image size read from the header BEFORE decoding, against
`max_pixels`), and the hand-over to `model.preprocess.to_grey_u8` for bit depth and colour (so
serving converts exactly as training did). Every failure is an ImageRejectedError with a message saying
what was expected; routes turn it into a 4xx.
"""

from __future__ import annotations

import enum
import io
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from model.preprocess import ImageFormatError, to_grey_u8

if TYPE_CHECKING:  # imported where used at run time: only TIFF bodies need it
    import tifffile


class ImageRejectedError(ValueError):
    """Posted bytes that are not an acceptable image; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class ImageType(enum.StrEnum):
    PNG = "image/png"
    JPEG = "image/jpeg"
    TIFF = "image/tiff"

    @property
    def extension(self) -> str:
        return {ImageType.PNG: "png", ImageType.JPEG: "jpg", ImageType.TIFF: "tif"}[self]


MAGIC = {
    ImageType.PNG: (b"\x89PNG\r\n\x1a\n",),
    ImageType.JPEG: (b"\xff\xd8\xff",),
    ImageType.TIFF: (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"),
}


@dataclass(frozen=True)
class DecodedImage:
    grey: np.ndarray  # (H, W) uint8
    image_type: ImageType
    width: int
    height: int


def parse_content_type(header: str | None) -> ImageType:
    media = (header or "").split(";", 1)[0].strip().lower()
    aliases = {"image/jpg": ImageType.JPEG, "image/tif": ImageType.TIFF}
    try:
        return aliases.get(media) or ImageType(media)
    except ValueError:
        accepted = ", ".join(t.value for t in ImageType)
        raise ImageRejectedError(f"expected Content-Type {accepted}; got {media or 'none'!r}", 415) from None


def decode_image(body: bytes, image_type: ImageType, max_pixels: int) -> DecodedImage:
    """8-bit grey pixels of `body`; raises ImageRejectedError (never decodes more than max_pixels)."""
    if not body:
        raise ImageRejectedError("expected an image in the request body; the body is empty")
    if not any(body.startswith(m) for m in MAGIC[image_type]):
        raise ImageRejectedError(
            f"body is not a {image_type.value} image (its first bytes do not match)", 415
        )
    width, height = _header_size(body, image_type)
    if width <= 0 or height <= 0:
        raise ImageRejectedError(f"image header gives an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageRejectedError(
            f"image is {width}x{height} = {width * height} pixels; at most {max_pixels} are accepted", 413
        )
    pixels = _decode(body, image_type)
    if pixels.shape[:2] != (height, width):
        raise ImageRejectedError(f"image decodes to {pixels.shape[:2]}, its header said {height}x{width}")
    try:
        grey = to_grey_u8(pixels)
    except ImageFormatError as exc:
        raise ImageRejectedError(f"cannot convert the image to 8-bit grey: {exc}", 422) from exc
    return DecodedImage(np.ascontiguousarray(grey), image_type, width, height)


def _decode(body: bytes, image_type: ImageType) -> np.ndarray:
    """Pixels as cv2 gives them: (H, W) or (H, W, C) with colour samples in blue, green, red order."""
    if image_type is ImageType.TIFF:
        return _decode_tiff(body)
    import cv2

    pixels = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ImageRejectedError(f"corrupt or truncated {image_type.value} image: it could not be decoded")
    return np.asarray(pixels)


def _decode_tiff(body: bytes) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(body)) as tif:
            page = tif.pages.first
            pixels = np.asarray(page.asarray())
            planar = _planar(page)
            rgb = page.photometric == tifffile.PHOTOMETRIC.RGB
    except Exception as exc:  # tifffile raises many types for bad files
        raise ImageRejectedError(f"corrupt or truncated TIFF: {exc}") from exc
    if planar:  # planar pages come as (C, H, W): samples last, as the shape check and to_grey_u8 expect
        pixels = np.moveaxis(pixels, 0, -1)
    if rgb and pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        # tifffile gives red, green, blue (alpha); to_grey_u8 weighs channels in cv2's order
        pixels = pixels[..., [2, 1, 0, *range(3, pixels.shape[2])]]
    return pixels


def _planar(page: tifffile.TiffPage) -> bool:
    """Whether a TIFF page stores its samples as separate planes, i.e. decodes to (C, H, W)."""
    return page.ndim == 3 and page.planarconfig == 2  # PLANARCONFIG.SEPARATE


def _header_size(body: bytes, image_type: ImageType) -> tuple[int, int]:
    """(width, height) from the header alone, so a bomb is refused before any pixel is decoded."""
    try:
        if image_type is ImageType.PNG:
            if body[12:16] != b"IHDR":
                raise ImageRejectedError("PNG without an IHDR header chunk")
            width, height = struct.unpack(">II", body[16:24])
            return int(width), int(height)
        if image_type is ImageType.JPEG:
            return _jpeg_size(body)
        return _tiff_size(body)
    except (struct.error, IndexError) as exc:
        raise ImageRejectedError(f"truncated {image_type.value} header") from exc


def _jpeg_size(body: bytes) -> tuple[int, int]:
    # walk the marker segments to the first start-of-frame (SOF0..SOF15, minus DHT/JPG/DAC)
    i = 2
    while i + 9 < len(body):
        if body[i] != 0xFF:
            raise ImageRejectedError("corrupt JPEG: expected a marker")
        marker = body[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", body[i + 2 : i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", body[i + 5 : i + 9])
            return int(width), int(height)
        i += 2 + length
    raise ImageRejectedError("corrupt or truncated JPEG: no frame header found")


def _tiff_size(body: bytes) -> tuple[int, int]:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(body)) as tif:
            page = tif.pages.first
            shape = page.shape
            if page.ndim < 2:
                raise ImageRejectedError(f"TIFF page has shape {shape}; expected a 2-D image")
            # (H, W) or (H, W, C) for contiguous samples, (C, H, W) for planar ones
            height, width = (shape[1], shape[2]) if _planar(page) else (shape[0], shape[1])
            return int(width), int(height)
    except ImageRejectedError:
        raise
    except Exception as exc:
        raise ImageRejectedError(f"corrupt or truncated TIFF: {exc}") from exc
