"""The ELPV pack: lossless round trip, the labels file whole, only the chosen parts' cells, clear errors."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from datasets.elpv import DatasetError, load_elpv, read_labels, split_indices
from datasets.pack import cli, part_indices, read_pack, write_pack

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


def hand_made_pack(path: Path, labels: bytes, info: bytes, cells: int) -> Path:
    """A pack written member by member: labels.csv, pack.json and `cells` grey WebP cells."""
    with tarfile.open(path, "w") as archive:
        for name, payload in (("labels.csv", labels), ("pack.json", info)):
            member = tarfile.TarInfo(name)
            member.size = len(payload)
            archive.addfile(member, io.BytesIO(payload))
        for i in range(cells):
            _, encoded = cv2.imencode(
                ".webp", np.full((300, 300), 100 + i, np.uint8), [cv2.IMWRITE_WEBP_QUALITY, 101]
            )
            member = tarfile.TarInfo(f"images/cell{i:04d}.webp")
            member.size = len(encoded)
            archive.addfile(member, io.BytesIO(encoded.tobytes()))
    return path


LABELS_2 = b"images/cell0000.png 0.0 mono\nimages/cell0001.png 1.0 poly\n"


def test_a_truncated_pack_is_refused_in_one_line(elpv_like: Path, tmp_path: Path) -> None:
    pack = tmp_path / "trainval.tar"
    write_pack(pack, ["train", "validation"], elpv_like)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(pack.read_bytes()[: pack.stat().st_size // 2])  # a transfer cut short
    with pytest.raises(DatasetError, match="truncated or damaged") as caught:
        read_pack(cut, tmp_path / "out")
    assert "\n" not in str(caught.value)


def test_labels_that_do_not_parse_are_refused(tmp_path: Path) -> None:
    pack = hand_made_pack(tmp_path / "p.tar", b"images/cell0000.png 1.0\n", b'{"cells": 1}', 1)
    with pytest.raises(DatasetError, match="expected 'path probability type'"):
        read_pack(pack, tmp_path / "out")
    empty = hand_made_pack(tmp_path / "e.tar", b"\n", b'{"cells": 0}', 0)
    with pytest.raises(DatasetError, match="lists no cells"):
        read_pack(empty, tmp_path / "out-e")


@pytest.mark.parametrize(
    ("info", "cells", "expected"),
    [
        (b'{"cells": 5}', 2, "holds 2 cells but its pack.json says 5"),
        (b"not json", 2, "no readable pack.json"),
        (b'{"parts": ["train"]}', 2, "no readable pack.json"),
        (b'{"cells": 3}', 3, "does not name, e.g. images/cell0002.png"),
    ],
)
def test_the_cells_must_be_those_pack_json_counts(
    tmp_path: Path, info: bytes, cells: int, expected: str
) -> None:
    pack = hand_made_pack(tmp_path / "p.tar", LABELS_2, info, cells)
    with pytest.raises(DatasetError, match=expected):
        read_pack(pack, tmp_path / "out")
    assert read_pack(hand_made_pack(tmp_path / "ok.tar", LABELS_2, b'{"cells": 2}', 2), tmp_path / "ok") == 2


def test_a_destination_that_is_a_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pack = hand_made_pack(tmp_path / "p.tar", LABELS_2, b'{"cells": 2}', 2)
    (tmp_path / "taken").write_text("a file")
    assert cli(["read", str(pack), str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "expected a folder to unpack into" in err and "\n" not in err
    # a folder inside a file cannot be made either
    assert cli(["read", str(pack), str(tmp_path / "taken" / "inside")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
