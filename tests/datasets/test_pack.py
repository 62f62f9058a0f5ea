"""The ELPV pack: lossless round trip, the labels file whole, only the chosen parts' cells, clear errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.elpv import DatasetError, load_elpv, read_labels, split_indices
from datasets.pack import part_indices, read_pack, write_pack

PROBABILITIES = (0.0, 1 / 3, 2 / 3, 1.0)


@pytest.fixture
def elpv_like(tmp_path: Path) -> Path:
    """A 48-cell folder laid out like the package's: every (probability, type) stratum, textured cells."""
    root = tmp_path / "elpv"
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(3)
    lines = []
    for i in range(48):
        name = f"images/cell{i:04d}.png"
        # smooth shading plus noise: compressible like a cell, but no two pixels need agree
        shading = np.linspace(60, 200, 300, dtype=np.float64)[None, :] + rng.normal(0, 9, (300, 300))
        cv2.imwrite(str(root / name), shading.clip(0, 255).astype(np.uint8))
        lines.append(f"{name} {PROBABILITIES[i % 4]:.10f} {('mono', 'poly')[(i // 4) % 2]}\n")
    (root / "labels.csv").write_text("".join(lines))
    return root


def test_round_trip_is_lossless_and_keeps_the_test_cells_out(elpv_like: Path, tmp_path: Path) -> None:
    pack = tmp_path / "trainval.tar"
    summary = write_pack(pack, ["train", "validation"], elpv_like)
    _, probabilities, types = read_labels(elpv_like / "labels.csv")
    train, validation, test = split_indices(probabilities, types)
    assert summary["cells"] == len(train) + len(validation)

    dest = tmp_path / "unpacked"
    assert read_pack(pack, dest) == summary["cells"]
    # the labels travel whole, so the split computed there is the split computed here
    assert (dest / "labels.csv").read_bytes() == (elpv_like / "labels.csv").read_bytes()
    kept = np.concatenate([train, validation])
    original, unpacked = load_elpv(elpv_like, kept), load_elpv(dest, kept)
    assert np.array_equal(original.images, unpacked.images)
    names, _, _ = read_labels(elpv_like / "labels.csv")
    assert not any((dest / name).exists() for name in names[test])


def test_part_indices_refuses_an_unknown_part() -> None:
    with pytest.raises(DatasetError, match="unknown split part"):
        part_indices(np.zeros(4), np.array(["mono"] * 4), ["training"])


def test_reading_what_is_not_a_pack_says_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="expected an ELPV pack file"):
        read_pack(tmp_path / "missing.tar", tmp_path / "out")
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(DatasetError, match="expected a tar file"):
        read_pack(tmp_path / "junk.tar", tmp_path / "out")
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    with pytest.raises(DatasetError, match=r"holds no labels\.csv"):
        read_pack(tmp_path / "empty.tar", tmp_path / "out")


def test_a_member_outside_the_destination_is_refused(tmp_path: Path) -> None:
    pack = tmp_path / "evil.tar"
    with tarfile.open(pack, "w") as archive:
        info = tarfile.TarInfo("../escaped.webp")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"RIFF"))
    with pytest.raises(DatasetError, match="would land outside"):
        read_pack(pack, tmp_path / "out")
    assert not (tmp_path / "escaped.png").exists()
