"""Geometry accuracy on synthetic frames (issue 4's acceptance); prints one JSON line.

Owns: the measurement behind "every cell's centre within 3% of a cell width of the truth in >= 99% of
frames" and "the classifier's verdicts on the cut cells agree with its verdicts on the original ELPV
cells for >= 99% of cells". Frames are composed of the ELPV test split's cells (never seen in
training) at 240-320 px per cell, so the classifier sees about its own input resolution.
`--half-cut-share` mixes in half-cut modules (120/144 half cells): their geometry is scored like the
rest, but a half cell is no ELPV cell, so only whole-cell frames count towards verdict agreement. What
half cells do get is the false-reject figure a half-cut line lives by: the share of halves of good
(functional) ELPV cells judged defective, beside the same share for good whole cells.

    python -m benchmarks.geometry_accuracy --frames 200 --model models/pvqc-cell/<version>
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from datasets.elpv import ElpvCells, load_elpv, read_labels, split_indices
from datasets.synthetic import SyntheticFrame, generate_frames
from model.card import SHIPPED_MODEL_DIR
from model.geometry import ModuleGeometry, cut_module
from model.onnx_export import onnx_probabilities
from model.preprocess import cell_probabilities, flatten_views

log = logging.getLogger(__name__)

DEFAULT_MODELS = (SHIPPED_MODEL_DIR, Path("var/dev-model"))
CENTRE_TOLERANCE = 0.03  # of a cell width


@dataclass
class FrameScore:
    ok: bool
    worst: float  # largest centre error over the frame's cells, in cell widths (inf if not found)


def score_frame(frame: SyntheticFrame, geometry: ModuleGeometry) -> FrameScore:
    """The worst cell-centre error of a found grid against the frame's truth, in cell widths."""
    if not geometry.ok or len(geometry.cells) != len(frame.cells):
        return FrameScore(False, float("inf"))
    found = np.array([cell.polygon.mean(axis=0) for cell in geometry.cells])
    widths = np.array([np.hypot(*(cell.polygon[1] - cell.polygon[0])) for cell in frame.cells])
    errors = np.hypot(*(found - frame.centres).T) / widths
    return FrameScore(True, float(errors.max()))


def test_cells() -> ElpvCells:
    from datasets.elpv import elpv_root

    _, probabilities, types = read_labels(elpv_root() / "labels.csv")
    _, _, test = split_indices(probabilities, types)
    return load_elpv(indices=test)


def default_model() -> Path | None:
    return next((path for path in DEFAULT_MODELS if (path / "model.onnx").is_file()), None)


@dataclass
class Judge:
    """One classifier under test: its session and threshold, its verdicts on the cut cells so far."""

    folder: Path
    session: object
    threshold: float
    cut: list[np.ndarray]
    good_halves_flagged: list[np.ndarray]


def load_judges(folders: list[Path], threads: int) -> list[Judge]:
    from model.card import read_card
    from model.onnx_export import onnx_session

    judges = []
    for folder in folders:
        card = read_card(folder)
        session = onnx_session(card.onnx_path(folder, "fp32"), threads=threads)
        judges.append(Judge(folder, session, card.operating_points.threshold, [], []))
    return judges


def half_pixel_shifted(images: np.ndarray) -> np.ndarray:
    half_pixel = np.array([[1, 0, 0.5], [0, 1, 0.5]], dtype=np.float32)
    return np.stack(
        [
            cv2.warpAffine(im, half_pixel, (im.shape[1], im.shape[0]), borderMode=cv2.BORDER_REPLICATE)
            for im in images
        ]
    )


def share(hits: np.ndarray) -> float | None:
    """The share of True, rounded; None (JSON null, not NaN) when there is nothing to count, as in a
    run of half-cut frames only."""
    return round(float(hits.mean()), 4) if hits.size else None


def judge_summary(judge: Judge, cells: ElpvCells, truth: np.ndarray) -> dict[str, object]:
    """Agreement of cut-cell verdicts with original-cell verdicts, and both against the labels."""
    original = onnx_probabilities(judge.session, cells.images) >= judge.threshold
    # The model's own floor: its verdicts on the originals moved by half a pixel. No geometry can
    # beat a model that this small a shift already changes.
    shifted = onnx_probabilities(judge.session, half_pixel_shifted(cells.images)) >= judge.threshold
    cut = np.concatenate(judge.cut) if judge.cut else np.zeros(0, bool)
    defective = cells.probabilities[truth] >= 0.5
    halves = np.concatenate(judge.good_halves_flagged) if judge.good_halves_flagged else np.zeros(0, bool)
    return {
        "model": str(judge.folder),
        "threshold": round(judge.threshold, 4),
        "cells_compared": int(cut.size),
        "verdict_agreement": share(cut == original[truth]),
        "agreement_originals_shifted_half_pixel": round(float((shifted == original).mean()), 4),
        # what the line would see: accuracy on the cut cells, beside accuracy on the same cells uncut
        "accuracy_on_cut_cells": share(cut == defective),
        "accuracy_on_original_cells": share(original[truth] == defective),
        "defective_on_original": int(original[truth].sum()),
        # half-cut frames: halves of functional cells judged defective, against functional whole cells
        "good_halves_judged": int(halves.size),
        "good_halves_flagged": share(halves),
        "good_whole_cells_flagged": share(cut[~defective]),
    }


def judge_good_halves(
    judges: list[Judge], geometry: ModuleGeometry, frame: SyntheticFrame, cells: ElpvCells
) -> None:
    """Each judge's verdicts on the half cells cut from functional ELPV cells, as serving judges them
    (both mirrored views, the lower probability)."""
    good = np.array([cells.probabilities[truth.index] == 0 for truth in frame.cells])
    flat, counts = flatten_views([cell.views for cell in geometry.cells])
    for judge in judges:
        probabilities = cell_probabilities(onnx_probabilities(judge.session, flat), counts)
        judge.good_halves_flagged.append(probabilities[good] >= judge.threshold)


def main(args: argparse.Namespace) -> dict[str, object]:
    cells = test_cells()
    folders = [] if args.no_classifier else [m for m in (args.model or []) if m is not None]
    judges = load_judges(folders, args.threads)
    scores: list[FrameScore] = []
    truth_indices: list[int] = []
    seconds: list[float] = []
    frames = generate_frames(
        cells,
        args.frames,
        seed=args.seed,
        cell_px=tuple(args.cell_px),
        photometric=not args.clean,
        half_cut_share=args.half_cut_share,
    )
    half_cut_frames = 0
    for number, frame in enumerate(frames):
        start = time.perf_counter()
        geometry = cut_module(frame.image, frame.rows, frame.cols, cells.images.shape[1])
        seconds.append(time.perf_counter() - start)
        score = score_frame(frame, geometry)
        scores.append(score)
        half_cut_frames += frame.spec.half_cut
        if score.worst > CENTRE_TOLERANCE:
            log.warning("frame %d: %s worst %.4f (%s)", number, frame.spec, score.worst, geometry.reason)
        if judges and score.ok and frame.spec.half_cut:
            judge_good_halves(judges, geometry, frame, cells)
        elif judges and score.ok:
            # classified as it goes, so memory stays flat; each cell as serving judges it (its views)
            flat, counts = flatten_views([cell.views for cell in geometry.cells])
            for judge in judges:
                probabilities = cell_probabilities(onnx_probabilities(judge.session, flat), counts)
                judge.cut.append(probabilities >= judge.threshold)
            truth_indices.extend(cell.index for cell in frame.cells)
    within = sum(score.worst <= CENTRE_TOLERANCE for score in scores)
    worst = np.array([score.worst for score in scores])
    result: dict[str, object] = {
        "benchmark": "geometry_accuracy",
        "frames": len(scores),
        "seed": args.seed,
        "cell_px": args.cell_px,
        "lighting_and_noise": not args.clean,
        "half_cut_frames": half_cut_frames,
        "frames_found": sum(score.ok for score in scores),
        "frames_within_3pct": within,
        "fraction_within_3pct": round(within / max(1, len(scores)), 4),
        "worst_centre_error_median": round(float(np.median(worst)), 4),
        "worst_centre_error_max": round(float(worst.max()), 4),
        "geometry_ms_median": round(1000 * float(np.median(seconds)), 1),
    }
    truth = np.array(truth_indices, dtype=int)
    summaries = [judge_summary(judge, cells, truth) for judge in judges]
    if summaries:
        result.update(summaries[0])  # the first model's figures at the top level, as before
        result["classifiers"] = summaries
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cell-px", type=float, nargs=2, default=[240.0, 320.0])
    parser.add_argument(
        "--model",
        type=Path,
        nargs="+",
        default=[default_model()],
        help="release folder(s); several are judged on the same cut cells",
    )
    parser.add_argument("--no-classifier", action="store_true")
    parser.add_argument(
        "--clean", action="store_true", help="same poses without gain, vignetting and noise (geometry only)"
    )
    parser.add_argument(
        "--half-cut-share", type=float, default=0.0, help="share of frames showing a half-cut module (0..1)"
    )
    parser.add_argument("--threads", type=int, default=0)
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(json.dumps(main(parse_args())))
