"""ELPV as one lossless pack, for a training machine that cannot install the `elpv-dataset` package.

Owns: writing the labels file whole with the cells of chosen parts of the fixed split as WebP lossless
(about 30 kB a cell against 35 kB as PNG: the 1,970 training and validation cells make 58.6 MB,
inside the 64 MiB a lent GPU machine receives), checking every cell decodes to the same pixels before
the pack is kept, and unpacking into a folder laid out like the package's (`labels.csv`,
`images/*.png`) for `PVQC_ELPV_ROOT`.

The labels file always travels whole: the split rule is computed from it, so a pack without the test
cells still gives the same train / validation / test indices, and the test cells stay on this machine.

    python -m datasets.pack write var/elpv-trainval.tar --parts train validation
    python -m datasets.pack read var/elpv-trainval.tar /tmp/elpv   # then PVQC_ELPV_ROOT=/tmp/elpv
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from datasets.elpv import DatasetError, elpv_root, load_elpv, read_labels, split_indices

log = logging.getLogger("datasets.pack")
LABELS = "labels.csv"
PARTS = ("train", "validation", "test")
WEBP_LOSSLESS = [cv2.IMWRITE_WEBP_QUALITY, 101]  # OpenCV: quality above 100 selects lossless


def part_indices(probabilities: np.ndarray, types: np.ndarray, parts: Sequence[str]) -> np.ndarray:
    """Indices of the labels file in the named parts of the fixed split, ascending."""
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise DatasetError(f"unknown split part(s) {unknown}; expected some of {list(PARTS)}")
    chosen = dict(zip(PARTS, split_indices(probabilities, types), strict=True))
    return np.sort(np.concatenate([chosen[p] for p in parts]))


def encode_lossless(image: np.ndarray, name: str) -> bytes:
    ok, encoded = cv2.imencode(".webp", image, WEBP_LOSSLESS)
    if not ok:
        raise DatasetError(f"OpenCV could not encode {name} as WebP")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
    if decoded is None or not np.array_equal(decoded, image):
        raise DatasetError(f"{name} does not survive WebP lossless unchanged; the pack would alter it")
    return encoded.tobytes()


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    archive.addfile(info, io.BytesIO(payload))


def write_pack(out: Path, parts: Sequence[str], root: Path | None = None) -> dict[str, int]:
    """Write the pack; returns how many cells and bytes it holds."""
    root = root or elpv_root()
    _, probabilities, types = read_labels(root / LABELS)
    indices = part_indices(probabilities, types, parts)
    cells = load_elpv(root, indices)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with tarfile.open(tmp, "w") as archive:
        _add(archive, LABELS, (root / LABELS).read_bytes())
        _add(archive, "pack.json", json.dumps({"parts": list(parts), "cells": len(cells)}).encode())
        for image, name in zip(cells.images, cells.names, strict=True):
            _add(archive, str(Path(name).with_suffix(".webp")), encode_lossless(image, str(name)))
    tmp.replace(out)  # a pack that exists is complete
    summary = {"cells": len(cells), "bytes": out.stat().st_size}
    log.info("packed %d cells of %s into %s (%d bytes)", len(cells), list(parts), out, summary["bytes"])
    return summary


def read_pack(pack: Path, dest: Path) -> int:
    """Unpack into `dest` (labels.csv, images/*.png); returns the number of cells written."""
    if not pack.is_file():
        raise DatasetError(f"expected an ELPV pack file at {pack}")
    if not tarfile.is_tarfile(pack):
        raise DatasetError(f"{pack} is not an ELPV pack (expected a tar file)")
    written = 0
    with tarfile.open(pack, "r") as archive:
        for member in archive.getmembers():
            handle = archive.extractfile(member)
            if handle is None:
                continue
            payload = handle.read()
            if not (dest / member.name).resolve().is_relative_to(dest.resolve()):
                raise DatasetError(f"{pack}: {member.name!r} would land outside {dest}; not an ELPV pack")
            if member.name in (LABELS, "pack.json"):
                (dest / member.name).parent.mkdir(parents=True, exist_ok=True)
                (dest / member.name).write_bytes(payload)
                continue
            image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise DatasetError(f"{pack}: {member.name} is not a readable WebP image")
            target = dest / Path(member.name).with_suffix(".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), image)
            written += 1
    if not (dest / LABELS).is_file():
        raise DatasetError(f"{pack} holds no {LABELS}; expected a pack written by `datasets.pack write`")
    log.info("unpacked %d cells into %s", written, dest)
    return written


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    write = verbs.add_parser("write", help="pack parts of the fixed split")
    write.add_argument("pack", type=Path)
    write.add_argument("--parts", nargs="+", default=["train", "validation"], choices=PARTS)
    read = verbs.add_parser("read", help="unpack into a folder for PVQC_ELPV_ROOT")
    read.add_argument("pack", type=Path)
    read.add_argument("dest", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.verb == "write":
            print(json.dumps(write_pack(args.pack, args.parts)))
        else:
            print(json.dumps({"cells": read_pack(args.pack, args.dest), "root": str(args.dest)}))
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
