"""`pvqc export-reviewed`: engineers' decisions leave the service as a training set of files.

Owns: the export format that `datasets/reviewed.py` reads, and writing it from the store:
- `cells/<inspection>_r<row>_c<col>.png`: each labelled cell, cut from the stored frame with the
  stored polygon by `model.geometry.stored_cell_picture`, as serving's geometry cut it (a whole cell square,
  a half cell in its own proportions, half as wide: datasets/reviewed.py makes the two mirrored views
  serving judges);
- `manifest.jsonl`: one JSON object per cell, sorted by (inspection, row, col): the file and its
  sha256, the label (functional / defective, defect type), where the label came from, `module` (the
  module's serial: the key `datasets/reviewed.py` splits train / validation / test on) and provenance
  (inspection id, line, serial, frame sha256, polygon, model version and probability, reviewer,
  decision id and time);
- `export.json`: what the folder holds: the format and the line filter it was exported with;
- `exports.jsonl`: one line per export run (when, format, line filter, how many cells new, reused,
  dropped).

Frames that are gone: a module whose frame the retention policy removed (serving/retention.py keeps
reviewed modules' frames, but a module can be reviewed after its frame was pruned) keeps the cells an
earlier export cut, and its other cells are left out; it is counted in `pruned_frames`, not as a
failure. A frame missing for any other reason is counted in `skipped_frames` (exit status 1).

Labels: a cell an engineer labelled takes that label (the latest decision wins). A module decided
PASS makes its other cells functional; a module decided FAIL confirms the model's clear verdicts
of its other cells (uncertain ones stay out: nobody said what they are).

Incremental and reproducible: a cell whose file is already there with the same frame, polygon and
size is not cut again; the manifest is rewritten whole from the database, so labels changed by later
decisions are current, and the same database gives byte-identical files. That is why a folder keeps
the line filter of its first export and refuses another one (see `check_folder`).

Split key: the module serial alone, the factory-wide id of the physical module. A module re-tested on
a rework line (L2/X after L1/X) is one module, so all its inspections fall on one side of the split;
keyed on line + serial (format pvqc-reviewed-1) its cells could be trained on and tested on. Folders
of that format are refused here and by the reader rather than mixed with the new key.
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
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from model.preprocess import INPUT_SIZE
from serving.db import Inspection, make_engine
from serving.images import ImageRejectedError, ImageType, decode_image
from serving.review import CellLabel, ReviewedModule, ReviewedVerdict, cell_key, reviewed_labels
from serving.settings import Settings
from serving.store import FrameStore
from serving.verdicts import InspectionKind

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.jsonl"
FOLDER_FILE = "export.json"
EXPORTS_FILE = "exports.jsonl"
CELLS_DIR = "cells"
# how cells are cut, kept with each exported file: files cut another way (half cells stretched to a
# square, before 2026-11-28) are cut again rather than reused
CUT = "cell_picture-1"  # datasets/reviewed.py's CUT (that package may not import serving)
# 2: `module` is the serial alone (1 keyed the split on line/serial); datasets/reviewed.py reads this
FORMAT = "pvqc-reviewed-2"
DEFAULT_CELL_SIZE = INPUT_SIZE  # ELPV's native size, what training reads
PAGE = 200


class ExportError(Exception):
    """The export folder cannot take this export; the message says what was expected."""


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    cells: int
    new: int
    reused: int
    modules: int
    skipped_frames: int  # frames missing or undecodable: some cells could not be cut
    pruned_frames: int = 0  # frames the retention policy removed: their new cells are left out


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


def describe_filter(line_id: str | None) -> str:
    return "all lines (no --line)" if line_id is None else f"--line {line_id}"


def check_folder(out: Path, line_id: str | None) -> dict[str, Any]:
    """What `out` must record in FOLDER_FILE after this export; ExportError when it cannot take it.

    A folder keeps the line filter of its first export. The manifest is rewritten whole from the
    query (that keeps labels current and the files reproducible), so exporting `--line L1` into a
    folder of all lines would drop the other lines' cells from the manifest while their PNGs stay,
    and training would silently see fewer cells. Keeping the other lines' earlier records instead
    would freeze their labels at an older export. ML staff who want one line export it to a folder
    of its own; refusing says so before anything is written.
    """
    wanted = {"format": FORMAT, "line": line_id}
    path = out / FOLDER_FILE
    if not path.is_file():
        if (out / MANIFEST_FILE).exists() or (out / EXPORTS_FILE).exists():
            raise ExportError(
                f"{out} holds an export of an older format (pvqc-reviewed-1: split keyed on line/serial, "
                f"no {FOLDER_FILE}); expected a folder of format {FORMAT}: export into a new folder"
            )
        return wanted
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); expected the folder's format and line") from exc
    if not isinstance(recorded, dict) or recorded.get("format") != FORMAT:
        found = recorded.get("format") if isinstance(recorded, dict) else recorded
        raise ExportError(f"{path} says format {found!r}; expected {FORMAT}: export into a new folder")
    if recorded.get("line") != line_id:
        was, asked = describe_filter(recorded.get("line")), describe_filter(line_id)
        raise ExportError(
            f"{out} was exported with {was}, not {asked}: one folder holds one line filter; "
            "run with the folder's filter or choose another --out"
        )
    return wanted


def export_reviewed(
    sessions: sessionmaker[Session],
    frames: FrameStore,
    out: Path,
    cell_size: int = DEFAULT_CELL_SIZE,
    line_id: str | None = None,
    max_pixels: int = 60_000_000,
) -> ExportSummary:
    from model.geometry import stored_cell_picture

    folder = check_folder(out, line_id)
    # the first query runs before anything is written, so a database that cannot be read leaves no folder
    page = reviewed_labels(sessions, line_id, None, PAGE)
    (out / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    previous = read_manifest(out)
    records: list[dict[str, Any]] = []
    new = reused = skipped = pruned = modules = 0
    while page:
        for module in page:
            inspection = module.inspection
            labels = cell_labels(module)
            if not labels or not inspection.geometry_ok:
                continue
            modules += 1
            grey: np.ndarray | None = None
            frame_gone = False  # then cells cut before stay, and those not cut yet are left out
            for cell in inspection.cells:
                key = cell_key(cell.row, cell.col)
                if key not in labels or cell.polygon is None:
                    continue
                name = f"{CELLS_DIR}/{inspection.id:08d}_r{cell.row:02d}_c{cell.col:02d}.png"
                polygon = [[round(float(v), 2) for v in point] for point in cell.polygon]
                source = {
                    "frame_sha256": inspection.frame_sha256,
                    "polygon": polygon,
                    "cell_size": cell_size,
                    "cut": CUT,
                }
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
                    if frame_gone:
                        continue
                    if grey is None:
                        grey = load_frame(frames, inspection, max_pixels)
                        if grey is None:
                            frame_gone = True
                            if inspection.frame_pruned_at is not None:
                                pruned += 1
                            else:
                                skipped += 1
                            continue
                    # a half cell in its own proportions: the reader makes the views serving judged
                    whole_frame = inspection.kind == InspectionKind.CELL.value
                    image = stored_cell_picture(grey, polygon, cell_size, whole_frame)
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
                        # split key: the serial alone, so a module re-tested on a rework line keeps one side
                        "module": inspection.serial,
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
        page = reviewed_labels(sessions, line_id, page[-1].inspection.id, PAGE)
    records.sort(key=lambda r: (r["inspection_id"], r["row"], r["col"]))
    # the folder's identity first: a manifest is never there without the filter it was written with
    write_atomically(out / FOLDER_FILE, json.dumps(folder, sort_keys=True) + "\n")
    write_atomically(out / MANIFEST_FILE, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    summary = ExportSummary(out, len(records), new, reused, modules, skipped, pruned)
    with (out / EXPORTS_FILE).open("a") as handle:
        line = {
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "format": FORMAT,
            "line": line_id,
            "cells": summary.cells,
            "new": new,
            "reused": reused,
            "modules": modules,
            "skipped_frames": skipped,
            "pruned_frames": pruned,
            "manifest_sha256": hashlib.sha256((out / MANIFEST_FILE).read_bytes()).hexdigest(),
        }
        handle.write(json.dumps(line) + "\n")
    log.info(
        "exported %d reviewed cells to %s (%d new, %d reused; frames missing %d, pruned %d)",
        len(records),
        out,
        new,
        reused,
        skipped,
        pruned,
    )
    return summary


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)  # readers see the old file or the new one, never half of one


def load_frame(frames: FrameStore, inspection: Inspection, max_pixels: int) -> np.ndarray | None:
    """The stored frame's grey pixels, decoded as serving decoded them; None when it is gone."""
    image_type = ImageType(inspection.frame_content_type)
    path = frames.path_for(inspection.frame_sha256, image_type.extension)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if inspection.frame_pruned_at is not None:  # the factory's choice (PVQC_FRAME_RETENTION_DAYS)
            log.info(
                "the frame of inspection %d was removed by the retention policy: its cells not cut "
                "before are left out",
                inspection.id,
            )
        else:
            log.warning("stored frame %s is missing: its cells are left out", path)
        return None
    try:
        return decode_image(data, image_type, max_pixels).grey
    except ImageRejectedError as exc:
        log.warning("stored frame %s cannot be decoded: %s", path, exc)
        return None


MIN_CELL_SIZE = 16  # a half cell keeps half of it: below this a cell is no picture of a cell


def cell_size_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < MIN_CELL_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected a whole number of pixels >= {MIN_CELL_SIZE}, got {text!r}"
        )
    return value


def check_store(database_url: str, frames_dir: Path) -> str | None:
    """Why the service's store cannot be exported from, or None when it looks like one.

    Checked before anything is opened: opening a SQLite URL creates the file it names (and
    `make_engine` and `FrameStore` create folders), so a mistyped --var-dir would otherwise leave a
    stray empty pvqc.db and frames/ behind and fail on the first query with a traceback.
    """
    try:
        url = make_url(database_url)
    except SQLAlchemyError as exc:  # ArgumentError: not a URL at all
        return f"{database_url!r} is not a database URL ({exc}); expected e.g. postgresql+psycopg://host/db"
    database = url.database or ""
    sqlite_file = url.get_backend_name() == "sqlite" and database not in ("", ":memory:")
    if sqlite_file and "uri" not in url.query and not Path(database).is_file():
        return (
            f"no database at {database}; expected the service's SQLite file "
            "(check --var-dir, --database-url or PVQC_DATABASE_URL)"
        )
    if not frames_dir.is_dir():
        return (
            f"no frame folder at {frames_dir}; expected the service's frames "
            "(check --var-dir or PVQC_FRAMES_DIR)"
        )
    return None


def error_line(exc: BaseException) -> str:
    """The first line of what went wrong: SQLAlchemy's own text adds the SQL and a link on more lines."""
    cause = getattr(exc, "orig", None) or exc
    lines = str(cause).strip().splitlines()
    return lines[0] if lines else type(cause).__name__


def unreadable_database(shown: str, exc: BaseException) -> str:
    """The one-line error of a command that could not read the service's database at `shown`."""
    return (
        f"cannot read the service's database at {shown}: {error_line(exc)}; expected the database of "
        "a pvqc service (check --var-dir, --database-url or PVQC_DATABASE_URL)"
    )


def cli(argv: list[str] | None = None) -> int:
    """Exit status: 0 exported (frames the retention policy removed included), 1 exported but some
    stored frames were missing or unreadable, 2 nothing exported."""
    parser = argparse.ArgumentParser(prog="pvqc export-reviewed", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, required=True, help="export folder; re-used, exports are incremental"
    )
    parser.add_argument(
        "--cell-size", type=cell_size_arg, default=DEFAULT_CELL_SIZE, help="pixels per cell side"
    )
    parser.add_argument("--line", help="only this line's modules (a folder keeps the filter it began with)")
    parser.add_argument("--database-url", help="SQLAlchemy URL; default: the service's (PVQC_ settings)")
    parser.add_argument("--var-dir", type=Path, help="the service's var folder (database and frames)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    overrides = {"database_url": args.database_url, "var_dir": args.var_dir}
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    database_url = settings.resolved_database_url
    problem = check_store(database_url, settings.resolved_frames_dir)
    if problem is not None:
        return fail(problem)
    shown = make_url(database_url).render_as_string(hide_password=True)
    try:
        engine = make_engine(database_url)
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
    except ExportError as exc:
        return fail(str(exc))
    except SQLAlchemyError as exc:
        return fail(unreadable_database(shown, exc))
    result = {
        "out": str(summary.out),
        "cells": summary.cells,
        "new": summary.new,
        "reused": summary.reused,
        "modules": summary.modules,
        "skipped_frames": summary.skipped_frames,
        "pruned_frames": summary.pruned_frames,
    }
    sys.stdout.write(json.dumps(result) + "\n")  # the command's output, one JSON line
    return 0 if summary.skipped_frames == 0 else 1


def fail(message: str) -> int:
    sys.stderr.write(f"pvqc export-reviewed: {message}\n")  # one line, no traceback: the command's output
    return 2


if __name__ == "__main__":
    sys.exit(cli())
