"""How steady a classifier's verdicts are through the camera and the cutter, on the validation split; one
JSON line per model.

Owns: the figures a training change aimed at issue 4's agreement is chosen by, without looking at the
test split (benchmarks/geometry_accuracy.py measures the acceptance on test cells). Validation cells are
composed into generated frames, located and cut by model/geometry.py, and each cut cell's verdict is
compared with the verdict on the same cell uncut; separately each uncut cell is given a random gain
(0.9-1.08) and sensor noise (sigma up to 6 grey levels), the camera's share alone. Takes release folders
(FP32 graph, the card's threshold) and training checkpoints (best.pt / last.pt: the threshold is chosen on
validation by best accuracy, as the export chooses it).

    python -m benchmarks.verdict_stability --model models/pvqc-cell/1.2.2 runs/<run>/last.pt
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from benchmarks.geometry_accuracy import score_frame
from datasets.elpv import ElpvCells, elpv_root, load_elpv, read_labels, split_indices
from datasets.synthetic import generate_frames
from model.card import SHIPPED_MODEL_DIR
from model.geometry import cut_module
from training.metrics import accuracy_threshold, classification_metrics

log = logging.getLogger(__name__)

Judge = Callable[[np.ndarray], np.ndarray]  # (N, H, W) uint8 cells -> (N,) defect probabilities


def validation_cells() -> ElpvCells:
    root = elpv_root()
    _, probabilities, types = read_labels(root / "labels.csv")
    _, validation, _ = split_indices(probabilities, types)
    return load_elpv(root, validation)


def release_judge(folder: Path, threads: int) -> tuple[Judge, float]:
    from model.card import read_card
    from model.onnx_export import onnx_probabilities, onnx_session

    card = read_card(folder)
    session = onnx_session(card.onnx_path(folder, "fp32"), threads=threads)
    return (lambda cells: onnx_probabilities(session, cells)), card.operating_points.threshold


def checkpoint_judge(path: Path) -> Judge:
    import torch

    from model.network import probabilities
    from training.train import load_checkpoint, model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(path)).eval()

    def judge(cells: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            batches = [
                probabilities(model, torch.from_numpy(cells[i : i + 32])[:, None].float()).numpy()
                for i in range(0, len(cells), 32)
            ]
        return np.concatenate(batches)

    return judge


def cut_validation_cells(cells: ElpvCells, frames: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(cut cells, their indices into `cells`) from `frames` generated whole-cell module frames."""
    cut: list[np.ndarray] = []
    indices: list[int] = []
    for frame in generate_frames(cells, frames, seed=seed, cell_px=(240.0, 320.0)):
        geometry = cut_module(frame.image, frame.rows, frame.cols, cells.images.shape[1])
        if not score_frame(frame, geometry).ok:
            log.warning("frame %s: no grid found (%s); its cells are left out", frame.spec, geometry.reason)
            continue
        cut.append(np.stack([cell.views[0] for cell in geometry.cells]))
        indices.extend(truth.index for truth in frame.cells)
    return np.concatenate(cut), np.array(indices, dtype=int)


def camera_copies(images: np.ndarray, seed: int) -> np.ndarray:
    """Each cell with its own gain (0.9-1.08) and Gaussian noise (sigma drawn up to 6 grey levels)."""
    rng = np.random.default_rng(seed)
    count = len(images)
    gain = rng.uniform(0.9, 1.08, (count, 1, 1))
    sigma = rng.uniform(0.0, 6.0, (count, 1, 1))
    noisy = images.astype(np.float32) * gain + rng.normal(0.0, 1.0, images.shape) * sigma
    return np.clip(noisy, 0, 255).astype(np.uint8)


def steadiness(uncut: np.ndarray, moved: np.ndarray, threshold: float) -> dict[str, object]:
    """Agreement of verdicts on moved cells with those on the uncut ones, and which way they flip."""
    before, after = uncut >= threshold, moved >= threshold
    return {
        "agreement": round(float((before == after).mean()), 4),
        "mean_abs_change": round(float(np.abs(moved - uncut).mean()), 4),
        "flips_to_defective": int((after & ~before).sum()),
        "flips_to_functional": int((before & ~after).sum()),
    }


def measure(
    name: str, judge: Judge, threshold: float | None, cells: ElpvCells, cut: np.ndarray, truth: np.ndarray
) -> dict[str, object]:
    uncut = judge(cells.images)
    if threshold is None:
        threshold = accuracy_threshold(uncut, cells.probabilities)
    metrics = classification_metrics(uncut, cells.probabilities, cells.types, threshold)
    return {
        "benchmark": "verdict_stability",
        "model": name,
        "validation_cells": len(cells.images),
        "validation_auc_one_view": round(float(metrics["roc_auc"]), 4),
        "validation_accuracy": round(float(metrics["accuracy"]), 4),
        "threshold": round(threshold, 4),
        "cut_cells": int(truth.size),
        "cut": steadiness(uncut[truth], judge(cut), threshold),
        "camera": steadiness(uncut, judge(camera_copies(cells.images, seed=1)), threshold),
    }


def main(args: argparse.Namespace) -> list[dict[str, object]]:
    cells = validation_cells()
    cut, truth = cut_validation_cells(cells, args.frames, args.seed)
    results = []
    for model in args.model:
        if model.is_dir():
            judge, threshold = release_judge(model, args.threads)
            results.append(measure(str(model), judge, threshold, cells, cut, truth))
        else:
            results.append(measure(str(model), checkpoint_judge(model), None, cells, cut, truth))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, nargs="+", default=[SHIPPED_MODEL_DIR], help="release folders or .pt files"
    )
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for result in main(parse_args()):
        print(json.dumps(result))
