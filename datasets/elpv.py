"""ELPV cells from the `elpv-dataset` package, and the fixed evaluation protocol of DESIGN.md.

Owns: loading the 2,624 cells with their labels (defect probability in {0, 1/3, 2/3, 1} and cell type),
the test split rule (25 % stratified by (probability, type), drawn with `default_rng(0)`), the committed
split file, and the validation split carved out of the training cells.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFECT_PROBABILITY = 0.5
TEST_FRACTION = 0.25
TEST_SEED = 0
VALIDATION_FRACTION = 0.15
VALIDATION_SEED = 1
ROOT_VARIABLE = "PVQC_ELPV_ROOT"
SPLIT_FILE = Path(__file__).with_name("splits") / "elpv_test.txt"


class DatasetError(RuntimeError):
    """The labelled data could not be found or does not have the expected form."""


@dataclass(frozen=True)
class ElpvCells:
    """Cells as a uint8 array (N, 300, 300) with labels aligned by index."""

    images: np.ndarray
    probabilities: np.ndarray
    types: np.ndarray
    names: np.ndarray

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: np.ndarray) -> ElpvCells:
        return ElpvCells(
            self.images[indices], self.probabilities[indices], self.types[indices], self.names[indices]
        )

    @property
    def defective(self) -> np.ndarray:
        return self.probabilities >= DEFECT_PROBABILITY


def elpv_root() -> Path:
    """The package's data folder (labels.csv and images/), or the folder named by PVQC_ELPV_ROOT."""
    override = os.environ.get(ROOT_VARIABLE)
    if override:
        root = Path(override)
    else:
        try:
            import elpv_dataset
        except ImportError as exc:
            raise DatasetError(
                "the ELPV data is missing: expected the package 'elpv-dataset' (pip install elpv-dataset)"
            ) from exc
        root = Path(elpv_dataset.__file__).parent / "data"
    if not (root / "labels.csv").is_file():
        raise DatasetError(f"expected ELPV labels at {root / 'labels.csv'}, found none")
    return root


def read_labels(labels_csv: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Names, probabilities and types from ELPV's whitespace-separated labels file, in file order."""
    names, probabilities, types = [], [], []
    try:
        text = labels_csv.read_text()
    except UnicodeDecodeError:
        raise DatasetError(f"{labels_csv} is not a text file: expected ELPV's labels") from None
    for line_number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 3:
            raise DatasetError(
                f"{labels_csv}:{line_number}: expected 'path probability type', got {line.strip()!r}"
            )
        try:
            probability = float(fields[1])
        except ValueError:
            raise DatasetError(
                f"{labels_csv}:{line_number}: expected a probability (0, 0.33, 0.67 or 1), got {fields[1]!r}"
            ) from None
        names.append(fields[0])
        probabilities.append(probability)
        types.append(fields[2])
    return np.array(names), np.array(probabilities, dtype=np.float64), np.array(types)


def load_elpv(root: Path | None = None, indices: np.ndarray | None = None) -> ElpvCells:
    """ELPV cells (all, or those at `indices` of the labels file) as grey uint8 arrays."""
    import cv2

    root = root or elpv_root()
    names, probabilities, types = read_labels(root / "labels.csv")
    if indices is not None:
        names, probabilities, types = names[indices], probabilities[indices], types[indices]
    images = np.empty((len(names), 300, 300), dtype=np.uint8)
    for i, name in enumerate(names):
        image = cv2.imread(str(root / name), cv2.IMREAD_GRAYSCALE)
        if image is None or image.shape != (300, 300):
            raise DatasetError(f"expected a 300x300 grey cell image at {root / name}")
        images[i] = image
    log.info("loaded %d ELPV cells from %s", len(names), root)
    return ElpvCells(images, probabilities, types, names)


def stratum_keys(probabilities: np.ndarray, types: np.ndarray) -> list[tuple[float, str]]:
    return [(round(float(p), 2), str(t)) for p, t in zip(probabilities, types, strict=True)]


def stratified_pick(keys: list[tuple[float, str]], fraction: float, seed: int) -> np.ndarray:
    """Indices drawn per stratum, strata in sorted order, one generator for all (DESIGN.md's rule)."""
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for key in sorted(set(keys)):
        members = np.array([i for i, k in enumerate(keys) if k == key])  # ascending
        rng.shuffle(members)
        # Python's round(): halves go to even, as the protocol says
        picked.extend(members[: round(fraction * len(members))].tolist())
    return np.array(sorted(picked), dtype=np.int64)


def fixed_test_indices(probabilities: np.ndarray, types: np.ndarray) -> np.ndarray:
    """The fixed test split: 654 of ELPV's 2,624 cells."""
    return stratified_pick(stratum_keys(probabilities, types), TEST_FRACTION, TEST_SEED)


def split_indices(probabilities: np.ndarray, types: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) index arrays; validation is stratified out of the non-test cells."""
    test = fixed_test_indices(probabilities, types)
    rest = np.setdiff1d(np.arange(len(probabilities)), test)
    keys = stratum_keys(probabilities[rest], types[rest])
    validation = rest[stratified_pick(keys, VALIDATION_FRACTION, VALIDATION_SEED)]
    train = np.setdiff1d(rest, validation)
    return train, validation, test


def read_split_file(path: Path = SPLIT_FILE) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"expected the committed test split at {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def write_split_file(names: np.ndarray, path: Path = SPLIT_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name}\n" for name in names))


def split_file_sha256(path: Path = SPLIT_FILE) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_split_matches(cells: ElpvCells, path: Path = SPLIT_FILE) -> None:
    """Fail loudly if the committed split and the rule disagree for these cells."""
    expected = cells.names[fixed_test_indices(cells.probabilities, cells.types)].tolist()
    committed = read_split_file(path)
    if expected != committed:
        raise DatasetError(f"the committed split {path} does not match DESIGN.md's rule")


def write_labels_csv(cells: ElpvCells, indices: np.ndarray, path: Path) -> None:
    """A plain CSV of (name, probability, type) for a subset: used by reports."""
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "probability", "type"])
        for i in indices:
            writer.writerow([cells.names[i], f"{cells.probabilities[i]:.4f}", cells.types[i]])
