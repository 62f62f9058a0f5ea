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
import zlib
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from datasets.elpv import DatasetError, elpv_root, load_elpv, read_labels, split_indices

log = logging.getLogger("datasets.pack")
LABELS = "labels.csv"
PACK_INFO = "pack.json"  # what the pack holds: its parts and its count of cells
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
        _add(archive, PACK_INFO, json.dumps({"parts": list(parts), "cells": len(cells)}).encode())
        for image, name in zip(cells.images, cells.names, strict=True):
            _add(archive, str(Path(name).with_suffix(".webp")), encode_lossless(image, str(name)))
    tmp.replace(out)  # a pack that exists is complete
    summary = {"cells": len(cells), "bytes": out.stat().st_size}
    log.info("packed %d cells of %s into %s (%d bytes)", len(cells), list(parts), out, summary["bytes"])
    return summary


def read_pack(pack: Path, dest: Path) -> int:
    """Unpack into `dest` (labels.csv, images/*.png); returns the number of cells written.

    The pack must be whole: its labels parse, and it holds the cells its pack.json counts, each one
    named in the labels file. A truncated copy (a transfer cut short) is refused, not half unpacked
    in silence.
    """
    if not pack.is_file():
        raise DatasetError(f"expected an ELPV pack file at {pack}")
    if not tarfile.is_tarfile(pack):
        raise DatasetError(f"{pack} is not an ELPV pack (expected a tar file)")
    if dest.exists() and not dest.is_dir():
        raise DatasetError(f"{dest} is a file; expected a folder to unpack into (existing or new)")
    try:
        written = unpack_members(pack, dest)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        # tarfile's own and its decompressors' errors for a file cut short or damaged
        raise DatasetError(
            f"{pack} is truncated or damaged ({' '.join(str(exc).split())}); expected a whole pack "
            "written by `datasets.pack write`"
        ) from exc
    except OSError as exc:  # writes are DatasetErrors already: this is the pack itself (gzip's errors too)
        raise DatasetError(f"cannot read {pack} as an ELPV pack: {' '.join(str(exc).split())}") from exc
    check_unpacked(pack, dest, written)
    log.info("unpacked %d cells into %s", len(written), dest)
    return len(written)


def unpack_members(pack: Path, dest: Path) -> list[str]:
    """Write every member under `dest`, the cells as PNG; returns the cells' names as in labels.csv."""
    written = []
    with tarfile.open(pack, "r") as archive:
        for member in archive.getmembers():
            handle = archive.extractfile(member)
            if handle is None:
                continue
            payload = handle.read()
            if not (dest / member.name).resolve().is_relative_to(dest.resolve()):
                raise DatasetError(f"{pack}: {member.name!r} would land outside {dest}; not an ELPV pack")
            if member.name in (LABELS, PACK_INFO):
                write_file(dest / member.name, payload)
                continue
            image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_GRAYSCALE)
            if image is None:
                raise DatasetError(f"{pack}: {member.name} is not a readable WebP image")
            name = str(Path(member.name).with_suffix(".png"))
            ok, png = cv2.imencode(".png", image)
            if not ok:
                raise DatasetError(f"OpenCV could not encode {name} as PNG")
            write_file(dest / name, png.tobytes())
            written.append(name)
    return written


def write_file(path: Path, payload: bytes) -> None:
    """Write one unpacked file, its folder made as needed; a destination that cannot be written is
    a DatasetError, so the command ends with one line."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload)
    except OSError as exc:
        problem = exc.strerror or str(exc)
        raise DatasetError(f"cannot write {path} ({problem}); expected a writable folder") from exc


def check_unpacked(pack: Path, dest: Path, cells: list[str]) -> None:
    """The labels parse, pack.json's count of cells was unpacked, and every cell is a labelled one."""
    if not (dest / LABELS).is_file():
        raise DatasetError(f"{pack} holds no {LABELS}; expected a pack written by `datasets.pack write`")
    names, _, _ = read_labels(dest / LABELS)  # a DatasetError naming the line for garbage
    if len(names) == 0:
        raise DatasetError(f"{pack}: its {LABELS} lists no cells; expected ELPV's labels")
    try:
        info = json.loads((dest / PACK_INFO).read_text())
        expected = info["cells"]
    except (OSError, ValueError, TypeError, KeyError):
        raise DatasetError(
            f"{pack} holds no readable {PACK_INFO} with its count of cells; expected a pack written by "
            "`datasets.pack write`"
        ) from None
    if expected != len(cells):
        raise DatasetError(f"{pack} holds {len(cells)} cells but its {PACK_INFO} says {expected}; incomplete")
    unlabelled = sorted(set(cells) - set(names.tolist()))
    if unlabelled:
        raise DatasetError(
            f"{pack}: {len(unlabelled)} cell(s) its {LABELS} does not name, e.g. {unlabelled[0]}; "
            "expected the labels the cells were packed with"
        )


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
    except OSError as exc:  # writing a pack: its folder inside a file, a disk that is full
        problem = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"error: {problem}; expected a pack path that can be written", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
