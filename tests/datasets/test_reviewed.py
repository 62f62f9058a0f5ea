"""Reviewed cells as a training set: the export format is read back, checked against its hashes,
and split by module, so no module has cells on both sides of a split."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.elpv import DatasetError
from datasets.reviewed import MANIFEST_FILE, Part, load_reviewed, module_part


def write_export(folder: Path, modules: int, cells: int = 4, size: int = 64) -> None:
    (folder / "cells").mkdir(parents=True)
    lines = []
    for m in range(modules):
        for c in range(cells):
            name = f"cells/{m:08d}_r00_c{c:02d}.png"
            data = cv2.imencode(".png", np.full((size, size), 10 * c, np.uint8))[1].tobytes()
            (folder / name).write_bytes(data)
            record = {
                "file": name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "label": "defective" if c == 0 else "functional",
                "module": f"L1/M{m}",
                "inspection_id": m,
                "row": 0,
                "col": c,
            }
            lines.append(json.dumps(record))
    (folder / MANIFEST_FILE).write_text("\n".join(lines) + "\n")


def test_cells_come_back_labelled_and_split_by_module(tmp_path: Path) -> None:
    write_export(tmp_path, modules=40)
    everything = load_reviewed(tmp_path, size=300)
    assert everything.images.shape == (160, 300, 300)
    assert everything.probabilities.tolist()[:4] == [1.0, 0.0, 0.0, 0.0]
    assert set(everything.types) == {"reviewed"}
    assert everything.names[0] == "reviewed:L1/M0/i0/r0c0"
    parts = {part: load_reviewed(tmp_path, part) for part in Part}
    assert sum(len(p) for p in parts.values()) == len(everything)
    modules = {part: {str(n).split("/i")[0] for n in cells.names} for part, cells in parts.items()}
    assert all(len(modules[part]) > 0 for part in Part)
    assert not (modules[Part.TRAIN] & modules[Part.TEST]) and not (
        modules[Part.TRAIN] & modules[Part.VALIDATION]
    )
    assert not (modules[Part.VALIDATION] & modules[Part.TEST])
    # the side is a function of the module alone: a later, larger export keeps every module's side
    assert all(module_part(f"L1/M{m}") is module_part(f"L1/M{m}") for m in range(40))


def test_a_changed_file_or_a_bad_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected a reviewed-cells manifest"):
        load_reviewed(tmp_path)
    write_export(tmp_path, modules=1)
    (tmp_path / "cells" / "00000000_r00_c01.png").write_bytes(b"changed")
    with pytest.raises(DatasetError, match="does not match the sha256"):
        load_reviewed(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(
        '{"file": "x.png", "sha256": "0", "label": "cracked", "module": "m"}\n'
    )
    with pytest.raises(DatasetError, match="expected label functional or defective"):
        load_reviewed(tmp_path)
