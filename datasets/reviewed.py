"""Reviewed cells: the training set the service's `pvqc export-reviewed` writes, read for training.

Owns: reading that format (`manifest.jsonl` + `cells/*.png`, see serving/export_reviewed.py; this
module never touches the service's database code), checking each file against its sha256, and the
split by module: every module (a record's `module`, the module serial: one id factory-wide, so a
module re-tested on a rework line is still one module) falls wholly into train, validation or test,
decided by a hash of it, so a module never has cells on both sides and a module keeps its side when
later exports add more modules. Cells come back as `ElpvCells` (labels 1.0 / 0.0, type "reviewed",
names carrying provenance), so training and evaluation take them like ELPV cells. A half cell
(stored in its own proportions) comes back as the two mirrored views serving judges
(model.preprocess.half_cell_views), both with the cell's label and name: training learns from both,
and evaluation (training/models.py) takes the lower probability per name, as serving does.

Format pvqc-reviewed-1 named modules line/serial, so a re-tested module's inspections were split
independently (leakage). Its manifests are refused, not re-split by serial: a model card names its
reviewed data by the manifest's sha256, and one manifest must always give the same split.
"""

from __future__ import annotations

import enum
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from datasets.elpv import DatasetError, ElpvCells
from model.preprocess import INPUT_SIZE

MANIFEST_FILE = "manifest.jsonl"
FORMAT = "pvqc-reviewed-2"  # serving/export_reviewed.py's FORMAT (this package may not import serving)
OLD_FORMATS = ("pvqc-reviewed-1",)
# how the export cut the cells (serving/export_reviewed.py's CUT): earlier exports stretched or mirrored
# half cells to a square, which is not what the line judges
CUT = "cell_picture-1"
REVIEWED_TYPE = "reviewed"
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.15


class Part(enum.StrEnum):
    TRAIN = "train"
    VALIDATION = "validation"
    TEST = "test"


def read_manifest(folder: Path) -> list[dict[str, Any]]:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        raise DatasetError(f"expected a reviewed-cells manifest at {path} (written by pvqc export-reviewed)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number} is not valid JSON: {exc}") from exc
        for key in ("file", "sha256", "label", "module"):
            if key not in record:
                raise DatasetError(f"{path}:{number} lacks {key!r}")
        # a record without a format is hand-written: its `module` must name the module, as FORMAT's do
        if record.get("format", FORMAT) != FORMAT:
            why = " (its split is keyed on line/serial)" if record["format"] in OLD_FORMATS else ""
            raise DatasetError(
                f"{path}:{number} is format {record['format']!r}{why}; expected {FORMAT}: "
                "re-export it with pvqc export-reviewed into a new folder"
            )
        if "format" in record and record.get("cut") != CUT:
            raise DatasetError(
                f"{path}:{number} was cut by an earlier pvqc export "
                f"({record.get('cut', 'half cells stretched')}); expected {CUT}: run pvqc export-reviewed "
                f"again into {folder}, which cuts those cells anew"
            )
        if record["label"] not in ("functional", "defective"):
            raise DatasetError(
                f"{path}:{number}: expected label functional or defective, got {record['label']!r}"
            )
        records.append(record)
    return records


def module_part(
    module: str, test_fraction: float = TEST_FRACTION, validation_fraction: float = VALIDATION_FRACTION
) -> Part:
    """Which side a module (its serial) falls on: a fixed function of its name, so it never moves."""
    bucket = int(hashlib.sha256(module.encode()).hexdigest()[:8], 16) / 0x1_0000_0000
    if bucket < test_fraction:
        return Part.TEST
    if bucket < test_fraction + validation_fraction:
        return Part.VALIDATION
    return Part.TRAIN


def load_reviewed(folder: Path, part: Part | None = None, size: int = INPUT_SIZE) -> ElpvCells:
    """The cells of one export folder (only those of `part`, when given) as (N, size, size) uint8, a half
    cell as two entries (its views) of one name."""
    import cv2

    from model.preprocess import image_views

    records = [r for r in read_manifest(folder) if part is None or module_part(r["module"]) is part]
    views: list[np.ndarray] = []
    for record in records:
        path = folder / record["file"]
        if not path.is_file():
            raise DatasetError(f"the manifest names {path}, which does not exist")
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != record["sha256"]:
            raise DatasetError(f"{path} does not match the sha256 in {folder / MANIFEST_FILE}")
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise DatasetError(f"{path} is not a readable image")
        views.append(image_views(image, size))
    counts = [len(v) for v in views]
    images = np.concatenate(views) if views else np.empty((0, size, size), dtype=np.uint8)
    labels = [1.0 if r["label"] == "defective" else 0.0 for r in records]
    probabilities = np.repeat(np.array(labels, dtype=np.float64), counts)
    types = np.array([REVIEWED_TYPE] * len(images), dtype=str)
    names = np.repeat(
        np.array(
            [
                f"reviewed:{r['module']}/i{r.get('inspection_id')}/r{r.get('row')}c{r.get('col')}"
                for r in records
            ],
            dtype=str,
        ),
        counts,
    )
    return ElpvCells(images, probabilities, types, names)


def cell_groups(names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(each cell's first entry, each entry's cell) by name, cells in first-seen order: a reviewed half
    cell is two entries of one name (its mirrored views, datasets/reviewed.py)."""
    _, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    order = np.argsort(first)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return first[order], rank[inverse.reshape(-1)]


def concatenate(parts: list[ElpvCells]) -> ElpvCells:
    """One ElpvCells of several (e.g. ELPV train cells and reviewed train cells)."""
    parts = [p for p in parts if len(p)] or parts[:1]
    return ElpvCells(
        np.concatenate([p.images for p in parts]),
        np.concatenate([p.probabilities for p in parts]),
        np.concatenate([p.types.astype(str) for p in parts]),
        np.concatenate([p.names.astype(str) for p in parts]),
    )


def reviewed_provenance(folders: list[str], weights: list[float]) -> list[dict[str, Any]]:
    """Each reviewed set as trained on: its folder, weight and the sha256 of its manifest then."""
    out = []
    for i, folder in enumerate(folders):
        manifest = Path(folder) / MANIFEST_FILE
        digest = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None
        out.append({"folder": folder, "weight": weights[i] if weights else 1.0, "manifest_sha256": digest})
    return out
