"""Reviewed cells as a training set: the export format is read back, checked against its hashes,
and split by module (its serial), so no module has cells on both sides of a split; manifests split by
the old line/serial key are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.elpv import DatasetError
from datasets.reviewed import CUT, FORMAT, MANIFEST_FILE, Part, load_reviewed, module_part


def write_export(
    folder: Path,
    modules: int,
    cells: int = 4,
    size: int = 64,
    format_: str | None = FORMAT,
    cut: str | None = CUT,
) -> None:
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
                "module": f"M{m}",
                "inspection_id": m,
                "line_id": "L1",
                "serial": f"M{m}",
                "row": 0,
                "col": c,
            }
            if format_ is not None:
                record["format"] = format_
            if cut is not None:
                record["cut"] = cut
            lines.append(json.dumps(record))
    (folder / MANIFEST_FILE).write_text("\n".join(lines) + "\n")


def test_cells_come_back_labelled_and_split_by_module(tmp_path: Path) -> None:
    write_export(tmp_path, modules=40)
    everything = load_reviewed(tmp_path, size=300)
    assert everything.images.shape == (160, 300, 300)
    assert everything.probabilities.tolist()[:4] == [1.0, 0.0, 0.0, 0.0]
    assert set(everything.types) == {"reviewed"}
    assert everything.names[0] == "reviewed:M0/i0/r0c0"
    parts = {part: load_reviewed(tmp_path, part) for part in Part}
    assert sum(len(p) for p in parts.values()) == len(everything)
    modules = {part: {str(n).split("/i")[0] for n in cells.names} for part, cells in parts.items()}
    assert all(len(modules[part]) > 0 for part in Part)
    assert not (modules[Part.TRAIN] & modules[Part.TEST]) and not (
        modules[Part.TRAIN] & modules[Part.VALIDATION]
    )
    assert not (modules[Part.VALIDATION] & modules[Part.TEST])
    # the side is a function of the module alone: a later, larger export keeps every module's side
    assert all(module_part(f"M{m}") is module_part(f"M{m}") for m in range(40))


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


def test_a_manifest_split_by_the_old_line_serial_key_is_refused(tmp_path: Path) -> None:
    # pvqc-reviewed-1 named modules line/serial: a module re-tested on a rework line was split twice
    old = tmp_path / "old"
    write_export(old, modules=2, format_="pvqc-reviewed-1")
    with pytest.raises(
        DatasetError, match=r"manifest.jsonl:1 is format 'pvqc-reviewed-1' \(its split is keyed"
    ):
        load_reviewed(old)
    with pytest.raises(DatasetError, match="expected pvqc-reviewed-2: re-export it"):
        load_reviewed(old, Part.TEST)
    future = tmp_path / "future"
    write_export(future, modules=1, format_="pvqc-reviewed-9")
    with pytest.raises(DatasetError, match="format 'pvqc-reviewed-9'; expected pvqc-reviewed-2"):
        load_reviewed(future)
    hand_written = (
        tmp_path / "hand-written"
    )  # no format: its `module` names the module, as the current format's
    write_export(hand_written, modules=2, format_=None)
    assert len(load_reviewed(hand_written)) == 8


@pytest.mark.parametrize(("cut", "named"), [("cell_views-1", "cell_views-1"), (None, "half cells stretched")])
def test_an_export_cut_by_an_earlier_pvqc_is_refused_saying_how_to_recut(
    tmp_path: Path, cut: str | None, named: str
) -> None:
    # its half cells are stretched or mirrored squares, not what the line judges
    write_export(tmp_path / "old", modules=1, cut=cut)
    with pytest.raises(
        DatasetError, match=rf"earlier pvqc export \({named}\); expected {CUT}: run pvqc export"
    ):
        load_reviewed(tmp_path / "old")
