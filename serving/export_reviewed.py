"""`pvqc export-reviewed`: engineers' decisions leave the service as a training set of files.

Owns: the export format that `datasets/reviewed.py` reads, and writing it from the store:
- `cells/<inspection>_r<row>_c<col>.png`: each labelled cell, cut from the stored frame with the
  stored polygon by `model.geometry.resample_cell`, the function serving's geometry cut it with;
- `manifest.jsonl`: one JSON object per cell, sorted by (inspection, row, col): the file and its
  sha256, the label (functional / defective, defect type), where the label came from, and provenance
  (inspection id, line, serial, frame sha256, polygon, model version and probability, reviewer,
  decision id and time);
- `exports.jsonl`: one line per export run (when, how many cells new, reused, dropped).

Labels: a cell an engineer labelled takes that label (the latest decision wins). A module decided
PASS makes its other cells functional; a module decided FAIL confirms the model's clear verdicts
of its other cells (uncertain ones stay out: nobody said what they are).

Incremental and reproducible: a cell whose file is already there with the same frame, polygon and
size is not cut again; the manifest is rewritten whole from the database, so labels changed by later
decisions are current, and the same database gives byte-identical files.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from model.preprocess import INPUT_SIZE
from serving.db import make_engine
from serving.images import ImageRejectedError, ImageType, decode_image
from serving.review import CellLabel, ReviewedModule, ReviewedVerdict, cell_key, reviewed_labels
from serving.settings import Settings
from serving.store import FrameStore
from serving.verdicts import InspectionKind

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.jsonl"
EXPORTS_FILE = "exports.jsonl"
CELLS_DIR = "cells"
FORMAT = "pvqc-reviewed-1"
DEFAULT_CELL_SIZE = INPUT_SIZE  # ELPV's native size, what training reads
PAGE = 200


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    cells: int
    new: int
    reused: int
    modules: int
    skipped_frames: int


def cell_labels(module: ReviewedModule) -> dict[str, dict[str, Any]]:
    """ "row,col" -> label record for the cells this reviewed module gives a label to."""
    labels = module.labels
    decided_module = labels.decided_module
    module_verdict = decided_module.after.get("verdict") if decided_module is not None else None
    out: dict[str, dict[str, Any]] = {}
    for cell in module.inspection.cells:
        key = cell_key(cell.row, cell.col)
        decision = labels.decided_cells.get(key)
        if decision is not None:
            after = decision.after
            out[key] = {
                "label": after["label"],
                "defect_type": after.get("defect_type"),
                "label_source": "cell_decision",
                "decision_id": decision.id,
                "reviewer": decision.reviewer,
                "decided_at": decision.created_at.isoformat(),
            }
            continue
        if decided_module is None:
            continue
        if module_verdict == ReviewedVerdict.PASS.value:
            label = CellLabel.FUNCTIONAL.value
        elif cell.verdict in (CellLabel.FUNCTIONAL.value, CellLabel.DEFECTIVE.value):
            label = cell.verdict  # the engineer failed the module and left the model's clear verdict
        else:
            continue
        out[key] = {
            "label": label,
            "defect_type": None,
            "label_source": "module_decision",
            "decision_id": decided_module.id,
            "reviewer": decided_module.reviewer,
            "decided_at": decided_module.created_at.isoformat(),
        }
    return out


def read_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {record["file"]: record for record in records}


def export_reviewed(
    sessions: sessionmaker[Session],
    frames: FrameStore,
    out: Path,
    cell_size: int = DEFAULT_CELL_SIZE,
    line_id: str | None = None,
    max_pixels: int = 60_000_000,
) -> ExportSummary:
    from model.geometry import resample_cell

    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out)
    records: list[dict[str, Any]] = []
    new = reused = skipped = modules = 0
    after: int | None = None
    while True:
        page = reviewed_labels(sessions, line_id, after, PAGE)
        if not page:
            break
        after = page[-1].inspection.id
        for module in page:
            inspection = module.inspection
            labels = cell_labels(module)
            if not labels or not inspection.geometry_ok:
                continue
            modules += 1
            grey: np.ndarray | None = None
            for cell in inspection.cells:
                key = cell_key(cell.row, cell.col)
                if key not in labels or cell.polygon is None:
                    continue
                name = f"{CELLS_DIR}/{inspection.id:08d}_r{cell.row:02d}_c{cell.col:02d}.png"
                polygon = [[round(float(v), 2) for v in point] for point in cell.polygon]
                source = {"frame_sha256": inspection.frame_sha256, "polygon": polygon, "cell_size": cell_size}
                earlier = previous.get(name)
                path = out / name
                if (
                    earlier is not None
                    and all(earlier.get(k) == v for k, v in source.items())
                    and path.is_file()
                    and hashlib.sha256(path.read_bytes()).hexdigest() == earlier.get("sha256")
                ):
                    digest = earlier["sha256"]
                    reused += 1
                else:
                    if grey is None:
                        grey = load_frame(
                            frames, inspection.frame_sha256, inspection.frame_content_type, max_pixels
                        )
                        if grey is None:
                            skipped += 1
                            break
                    if inspection.kind == InspectionKind.CELL.value:
                        from model.preprocess import resize_cell

                        image = resize_cell(grey, cell_size)
                    else:
                        image = resample_cell(grey, np.asarray(polygon, dtype=np.float32), cell_size)
                    ok, encoded = cv2.imencode(".png", image)
                    if not ok:
                        raise RuntimeError(f"could not encode {name} as PNG")
                    data = encoded.tobytes()
                    digest = hashlib.sha256(data).hexdigest()
                    path.write_bytes(data)
                    new += 1
                records.append(
                    {
                        "file": name,
                        "sha256": digest,
                        **labels[key],
                        "module": f"{inspection.line_id}/{inspection.serial}",
                        "inspection_id": inspection.id,
                        "line_id": inspection.line_id,
                        "serial": inspection.serial,
                        "frame_id": inspection.frame_id,
                        "row": cell.row,
                        "col": cell.col,
                        "model_name": inspection.model_name,
                        "model_version": inspection.model_version,
                        "model_probability": round(cell.probability, 6),
                        "model_verdict": cell.verdict,
                        "inspected_at": inspection.created_at.isoformat(),
                        **source,
                        "format": FORMAT,
                    }
                )
    records.sort(key=lambda r: (r["inspection_id"], r["row"], r["col"]))
    temporary = out / f".{MANIFEST_FILE}.tmp"
    temporary.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    temporary.replace(out / MANIFEST_FILE)
    summary = ExportSummary(out, len(records), new, reused, modules, skipped)
    with (out / EXPORTS_FILE).open("a") as handle:
        line = {
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cells": summary.cells,
            "new": new,
            "reused": reused,
            "modules": modules,
            "skipped_frames": skipped,
            "manifest_sha256": hashlib.sha256((out / MANIFEST_FILE).read_bytes()).hexdigest(),
        }
        handle.write(json.dumps(line) + "\n")
    log.info("exported %d reviewed cells to %s (%d new, %d reused)", len(records), out, new, reused)
    return summary


def load_frame(frames: FrameStore, digest: str, content_type: str, max_pixels: int) -> np.ndarray | None:
    """The stored frame's grey pixels, decoded as serving decoded them; None when it is gone."""
    image_type = ImageType(content_type)
    path = frames.path_for(digest, image_type.extension)
    if not path.is_file():
        log.warning("stored frame %s is missing: its cells are left out", path)
        return None
    try:
        return decode_image(path.read_bytes(), image_type, max_pixels).grey
    except ImageRejectedError as exc:
        log.warning("stored frame %s cannot be decoded: %s", path, exc)
        return None


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pvqc export-reviewed", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="export folder; re-used, exports are incremental"
    )
    parser.add_argument("--cell-size", type=int, default=DEFAULT_CELL_SIZE, help="pixels per cell side")
    parser.add_argument("--line", help="only this line's modules")
    parser.add_argument("--database-url", help="SQLAlchemy URL; default: the service's (PVQC_ settings)")
    parser.add_argument("--var-dir", type=Path, help="the service's var folder (database and frames)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"database_url": args.database_url, "var_dir": args.var_dir}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    engine = make_engine(settings.resolved_database_url)
    try:
        summary = export_reviewed(
            sessionmaker(engine, expire_on_commit=False),
            FrameStore(settings.resolved_frames_dir),
            args.out,
            args.cell_size,
            args.line,
            settings.max_pixels,
        )
    finally:
        engine.dispose()
    result = {
        "out": str(summary.out),
        "cells": summary.cells,
        "new": summary.new,
        "reused": summary.reused,
        "modules": summary.modules,
        "skipped_frames": summary.skipped_frames,
    }
    sys.stdout.write(json.dumps(result) + "\n")  # the command's output, one JSON line
    return 0 if summary.skipped_frames == 0 else 1


if __name__ == "__main__":
    sys.exit(cli())
