"""Pictures for people, made on demand and never on the line's hot path: frame previews and heat maps.

Owns: a JPEG preview of a stored frame (browsers show no TIFF and no 16-bit PNG, and a camera frame
is far larger than a screen needs), made once per frame and width and kept on disk beside the
frames, one at a time per replica (fifty screens asking for the same new thumbnail cost one
decode, and previews never take more than one core from the line); and a cell's heat map: the
cell is cut again from the stored frame as the pipeline cut it (`model.geometry.stored_cell_views`)
and run through the micro-batcher, whose `cam` output is the class activation map (defect logit per
position of the last feature map); a half cell shows the mirrored view that decided its probability
(the lower); a full batcher queue answers
the ingestion routes' 503 with Retry-After. Also where every reader finds a stored frame's file
(`stored_frame_path`): a frame that is gone is a 410 that says whether the retention policy removed
it (serving/retention.py). Blocking helpers run in worker threads.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import anyio
import numpy as np

from serving.db import Inspection
from serving.errors import ApiError
from serving.images import ImageRejectedError, ImageType, decode_image
from serving.inference import QueueFullError
from serving.store import FrameStore
from serving.verdicts import InspectionKind

if TYPE_CHECKING:  # serving.app builds the PreviewCache: a run-time import would be circular
    from serving.app import Services

log = logging.getLogger(__name__)

CAM_OUTPUT = "cam"  # the name model/onnx_export.py gives the activation map output
JPEG_QUALITY = 85
PREVIEW_WIDTHS = (160, 360, 720, 1024, 1600, 2048, 4096)  # asked widths snap up: a bounded cache


class PreviewCache:
    """JPEG previews under `root/<sha256>-<width>.jpg`, computed once, one at a time."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = anyio.Lock()

    async def get(self, services: Services, row: Inspection, width: int) -> bytes:
        if row.frame_pruned_at is not None:
            # a preview made while the pass deleted the frame may outlive it: the frame decides
            await anyio.to_thread.run_sync(stored_frame_path, services.frames, row)
        width = next((w for w in PREVIEW_WIDTHS if w >= width), PREVIEW_WIDTHS[-1])
        path = self.root / f"{row.frame_sha256}-{width}.jpg"
        if path.is_file():
            return await anyio.Path(path).read_bytes()
        async with self._lock:
            if path.is_file():  # made while this request waited
                return await anyio.Path(path).read_bytes()

            def make() -> bytes:
                data = preview_jpeg(load_grey(services, row), width)
                self.root.mkdir(parents=True, exist_ok=True)
                temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
                try:
                    temporary.write_bytes(data)
                    temporary.replace(path)  # readers see the whole file or none; a lost one is remade
                except OSError:
                    # a preview is a cache: a full disk must not also collect orphans; answer anyway
                    temporary.unlink(missing_ok=True)
                    log.warning("preview %s not cached: the write failed", path.name, exc_info=True)
                return data

            return await anyio.to_thread.run_sync(make, limiter=services.frame_limiter)


def stored_frame_path(frames: FrameStore, row: Inspection) -> Path:
    """The file of `row`'s frame; 410 Gone when it is not stored, saying why when the policy removed it.

    A pruned row's file is served if it is there: identical bytes posted since for a new row put it
    back, and they are the same bytes.
    """
    path = frames.path_for(row.frame_sha256, ImageType(row.frame_content_type).extension)
    if not path.is_file():
        raise frame_gone(row)
    return path


def frame_gone(row: Inspection) -> ApiError:
    """The 410 of a frame that is not stored: the retention policy's, or another loss."""
    if row.frame_pruned_at is None:
        # also a frame the retention pass deletes while this request reads the row
        return ApiError(410, f"frame {row.frame_sha256} of inspection {row.id} is no longer stored")
    return ApiError(
        410,
        f"the frame of inspection {row.id} was removed by the frame retention policy "
        f"(PVQC_FRAME_RETENTION_DAYS) at {row.frame_pruned_at.isoformat(timespec='seconds')}; its "
        "verdict and cell scores are kept",
    )


def open_stored_frame(frames: FrameStore, row: Inspection) -> tuple[BinaryIO, int]:
    """`row`'s frame file opened for reading, and its size; 410 when it is gone.

    Served from the open file, not its name: a retention pass that deletes it meanwhile cannot take
    the bytes from under a response that has begun (the name goes, the open file stays readable).
    """
    path = stored_frame_path(frames, row)
    try:
        handle = path.open("rb")
    except FileNotFoundError:  # deleted between the look and the open
        raise frame_gone(row) from None
    return handle, os.fstat(handle.fileno()).st_size


def load_grey(services: Services, row: Inspection) -> np.ndarray:
    """The stored frame of `row` as 8-bit grey, decoded exactly as at ingestion."""
    image_type = ImageType(row.frame_content_type)
    handle, _ = open_stored_frame(services.frames, row)
    with handle:
        data = handle.read()
    try:
        return decode_image(data, image_type, services.settings.max_pixels).grey
    except ImageRejectedError as exc:  # it was accepted once: the file must have been damaged since
        raise ApiError(500, f"stored frame of inspection {row.id} no longer decodes: {exc}") from exc


def preview_jpeg(grey: np.ndarray, width: int) -> bytes:
    import cv2

    if grey.shape[1] > width:
        height = max(1, round(grey.shape[0] * width / grey.shape[1]))
        grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA)  # area: no aliasing
    ok, data = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise ApiError(500, "could not encode the preview")
    return bytes(data.tobytes())


def _cell_views(services: Services, row: Inspection, polygon: list[list[float]], size: int) -> np.ndarray:
    """The cell's views as the pipeline made them, cut again from the stored frame."""
    from model.geometry import stored_cell_views  # imported here: geometry pulls in more than the rest

    whole_frame = row.kind == InspectionKind.CELL.value
    return stored_cell_views(load_grey(services, row), polygon, size, whole_frame)


async def cell_heatmap(services: Services, row: Inspection, cell_row: int, cell_col: int) -> dict[str, Any]:
    """The cell as the network saw it (PNG data URL) and its activation map as probabilities."""
    cell = next((c for c in row.cells if c.row == cell_row and c.col == cell_col), None)
    if cell is None:
        raise ApiError(404, f"inspection {row.id} has no cell at row {cell_row}, col {cell_col}")
    if cell.polygon is None:
        raise ApiError(409, f"cell {cell_row},{cell_col} of inspection {row.id} has no stored outline")
    runtime = services.runtime  # one model for the whole heat map, whatever a hot swap does meanwhile
    if CAM_OUTPUT not in runtime.output_names:
        raise ApiError(501, f"model {runtime.card.name} has no {CAM_OUTPUT!r} output for heat maps")
    polygon = cell.polygon
    views = await anyio.to_thread.run_sync(
        lambda: _cell_views(services, row, polygon, runtime.size), limiter=services.frame_limiter
    )
    try:
        outputs = await services.batcher.infer(views[:, None], runtime)
    except QueueFullError as exc:
        services.refuse_queue_full(str(exc))  # the ingestion routes' 503 with Retry-After
    probabilities = np.asarray(outputs[runtime.card.probability_output], dtype=np.float64).reshape(-1)
    chosen = int(np.argmin(probabilities))  # the view whose probability is the cell's (cell_probabilities)
    logits = np.asarray(outputs[CAM_OUTPUT][chosen], dtype=np.float64)
    heat = 1.0 / (1.0 + np.exp(-logits))  # per-position defect probability, same scale as the cell's
    return {
        "inspection_id": row.id,
        "row": cell_row,
        "col": cell_col,
        "stored_probability": cell.probability,
        "probability": float(probabilities[chosen]),
        "views": len(views),
        "cam": heat.round(4).tolist(),
        "cell_png": _png_data_url(views[chosen]),
    }


def _png_data_url(pixels: np.ndarray) -> str:
    import base64

    import cv2

    ok, data = cv2.imencode(".png", pixels)
    if not ok:
        raise ApiError(500, "could not encode the cell image")
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode()
