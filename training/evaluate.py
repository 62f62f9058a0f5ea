"""Score a released model on the fixed ELPV test split: `python -m training.evaluate --model DIR`.

Owns: running the model's ONNX files (FP32 and INT8) over the 654 test cells, optionally averaged over
the 8 dihedral views, computing DESIGN.md's metrics at the card's shipped threshold, and writing the
report: `report.json`, `report.md`, and PNG plots (ROC curve, confusion matrix, reliability diagram).
With `--update-card` the metrics are written into the model card too.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from datasets.elpv import (
    DatasetError,
    ElpvCells,
    check_split_matches,
    elpv_root,
    load_elpv,
    read_labels,
    read_split_file,
)
from model.card import SHIPPED_MODEL_DIR, CardError, ModelCard, read_card, write_card
from model.onnx_export import ModelFileError, onnx_probabilities, onnx_session
from model.preprocess import dihedral_view
from training.metrics import classification_metrics

log = logging.getLogger("training.evaluate")
REPORT_FILES = ("report.json", "report.md", "roc.png", "confusion.png", "reliability.png")


class ReportError(ValueError):
    """A report folder that cannot be written."""


def test_cells(limit: int | None = None) -> ElpvCells:
    """The committed test split's cells (checked against the rule), or its first `limit`."""
    root = elpv_root()
    names, _, _ = read_labels(root / "labels.csv")
    wanted = read_split_file()
    position = {name: i for i, name in enumerate(names.tolist())}
    missing = [name for name in wanted if name not in position]
    if missing:
        raise DatasetError(f"the split file names cells that ELPV lacks, e.g. {missing[0]}")
    indices = np.array([position[name] for name in wanted])
    if limit is not None:
        indices = indices[:limit]
    return load_elpv(root, indices)


def predict_per_view(model_path: Path, images: np.ndarray, views: int, threads: int = 0) -> np.ndarray:
    """(views, N) probabilities from an ONNX file for the first `views` dihedral views (view 0: as is)."""
    session = onnx_session(model_path, threads)
    return np.stack([onnx_probabilities(session, dihedral_view(images, v)) for v in range(views)])


def predict(model_path: Path, images: np.ndarray, tta: bool, threads: int = 0) -> np.ndarray:
    """Probabilities from an ONNX file, averaged over the 8 dihedral views when `tta`."""
    return predict_per_view(model_path, images, 8 if tta else 1, threads).mean(axis=0)


def plot_report(results: dict[str, dict[str, Any]], labels: np.ndarray, out: Path) -> None:
    """ROC curves, confusion matrices and reliability diagrams of every variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import roc_curve

    defective = labels >= 0.5
    fig, ax = plt.subplots(figsize=(5, 5))
    for variant, result in results.items():
        if 0 < defective.sum() < len(defective):
            fpr, tpr, _ = roc_curve(defective, result["probabilities"])
            ax.plot(fpr, tpr, label=f"{variant} (AUC {result['metrics']['roc_auc']:.3f})")
    ax.axvline(0.05, color="grey", linestyle=":", label="5% false rejects")
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)
    ax.set(
        xlabel="false-reject rate (functional cells flagged)",
        ylabel="recall of defective cells",
        title="ROC, ELPV test split",
    )
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 4), squeeze=False)
    for ax, (variant, result) in zip(axes[0], results.items(), strict=True):
        c = result["metrics"]["confusion"]
        matrix = np.array(
            [[c["true_functional"], c["false_defective"]], [c["false_functional"], c["true_defective"]]]
        )
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(value), ha="center", va="center", fontsize=14, color="black")
        ax.set_xticks([0, 1], ["functional", "defective"])
        ax.set_yticks([0, 1], ["functional", "defective"])
        ax.set(xlabel="predicted", ylabel="true", title=f"{variant} @ {result['metrics']['threshold']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    both_classes = bool(0 < defective.sum() < len(defective))
    for variant, result in results.items():
        if both_classes:
            observed, predicted = calibration_curve(
                defective, result["probabilities"], n_bins=10, strategy="quantile"
            )
            ax.plot(predicted, observed, marker="o", label=variant)
    ax.plot([0, 1], [0, 1], color="lightgrey", linewidth=0.8)
    ax.set(xlabel="predicted probability", ylabel="observed share defective", title="Reliability")
    if both_classes:
        ax.legend(loc="upper left")
    else:  # an empty plot says why, rather than leaving the reader to guess
        ax.text(0.5, 0.5, "needs functional and defective cells", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)


def markdown_report(card: ModelCard, results: dict[str, dict[str, Any]], tta: bool) -> str:
    rows = [
        ("accuracy", "accuracy"),
        ("F1 (defective)", "f1_defective"),
        ("ROC-AUC", "roc_auc"),
        ("recall at 5% false rejects", "recall_at_5pct_false_reject"),
        ("4-grade accuracy", "grade4_accuracy"),
    ]
    variants = list(results)
    lines = [
        f"# {card.name} {card.version}: evaluation on the ELPV test split",
        "",
        f"{results[variants[0]]['metrics']['cells']} cells, threshold {card.operating_points.threshold:.3f} "
        f"(chosen on the validation split), {'8-view test-time averaging' if tta else 'single view'}"
        + ("; the `_single_view` columns score view 0 alone, as the service judges a cell." if tta else "."),
        "",
        "| metric | " + " | ".join(variants) + " |",
        "| --- | " + " | ".join("---" for _ in variants) + " |",
    ]
    for title, key in rows:
        values = [results[v]["metrics"][key] for v in variants]
        lines.append(f"| {title} | " + " | ".join("n/a" if x is None else f"{x:.4f}" for x in values) + " |")
    for cell_type in results[variants[0]]["metrics"]["accuracy_per_type"]:
        values = [results[v]["metrics"]["accuracy_per_type"][cell_type] for v in variants]
        lines.append(f"| accuracy, {cell_type} cells | " + " | ".join(f"{x:.4f}" for x in values) + " |")
    lines.append(
        "| seconds to score | " + " | ".join(f"{results[v]['seconds']:.1f}" for v in variants) + " |"
    )
    lines += [
        "",
        "![ROC](roc.png) ![confusion](confusion.png) ![reliability](reliability.png)",
        "",
        card.licence,
        "",
    ]
    return "\n".join(lines)


def scored(probabilities: np.ndarray, cells: ElpvCells, threshold: float, seconds: float) -> dict[str, Any]:
    metrics = classification_metrics(probabilities, cells.probabilities, cells.types, threshold)
    return {"metrics": metrics, "probabilities": probabilities, "seconds": seconds}


def evaluate_release(
    folder: Path,
    out: Path,
    tta: bool = True,
    limit: int | None = None,
    update_card: bool = True,
    threads: int = 0,
) -> ModelCard:
    """Score every ONNX variant of a release folder; write the report; put metrics into the card."""
    if out.exists() and not out.is_dir():  # refused before the test cells load and the model runs
        raise ReportError(f"--out {out} is a file; expected a folder for the report (existing or new)")
    card = read_card(folder)
    cells = test_cells(limit)
    if limit is None:
        check_split_matches(load_labels_only())
    out.mkdir(parents=True, exist_ok=True)
    threshold = card.operating_points.threshold
    results: dict[str, dict[str, Any]] = {}
    served: dict[str, dict[str, Any]] = {}
    for variant in card.files:
        started = time.perf_counter()
        per_view = predict_per_view(card.onnx_path(folder, variant), cells.images, 8 if tta else 1, threads)
        seconds = time.perf_counter() - started
        results[variant] = scored(per_view.mean(axis=0), cells, threshold, seconds)
        if tta:
            # what the line gets: the service judges each cell once, in the orientation it was cut
            # (its time is an eighth of the 8 views': every view costs the same)
            served[f"{variant}_single_view"] = scored(per_view[0], cells, threshold, seconds / 8)
        figures = {k: v for k, v in results[variant]["metrics"].items() if isinstance(v, float)}
        log.info("%s: %s", variant, figures)
    plot_report(results, cells.probabilities, out)
    results.update(served)
    report = {
        "model": card.name,
        "version": card.version,
        "split": "ELPV test split (datasets/splits/elpv_test.txt)",
        "tta_views": 8 if tta else 1,
        "variants": {v: {"metrics": r["metrics"], "seconds": r["seconds"]} for v, r in results.items()},
        "cells": [
            {
                "name": n,
                "label": float(p),
                "type": str(t),
                **{v: float(r["probabilities"][i]) for v, r in results.items()},
            }
            for i, (n, p, t) in enumerate(zip(cells.names, cells.probabilities, cells.types, strict=True))
        ],
    }
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown_report(card, results, tta))
    if update_card and limit is None:
        card.metrics["test"] = {v: r["metrics"] for v, r in results.items()}
        card.metrics["test_tta_views"] = 8 if tta else 1
        write_card(card, folder)
    return card


def load_labels_only() -> ElpvCells:
    """ELPV's labels without images: enough to check the committed split against the rule."""
    names, probabilities, types = read_labels(elpv_root() / "labels.csv")
    return ElpvCells(np.zeros((len(names), 0, 0), np.uint8), probabilities, types, names)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=SHIPPED_MODEL_DIR, help="release folder with card.json")
    parser.add_argument("--out", type=Path, default=Path("var/report"), help="folder for the report files")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="single view instead of 8")
    parser.add_argument("--limit", type=int, help="score only the first N test cells (a quick look)")
    parser.add_argument("--update-card", action="store_true", help="write the metrics into the model card")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit expects a positive number of test cells, got {args.limit}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        card = evaluate_release(args.model, args.out, args.tta, args.limit, args.update_card, args.threads)
    except (CardError, DatasetError, ModelFileError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a report folder inside a file, a disk that is full, a release not readable
        problem = f"{exc.strerror}: {exc.filename}" if exc.strerror and exc.filename else str(exc)
        print(f"error: {problem}; expected --out to be a folder for the report", file=sys.stderr)
        return 2
    summary = json.loads((args.out / "report.json").read_text())["variants"]
    print(
        json.dumps(
            {
                "model": f"{card.name} {card.version}",
                "report": str(args.out),
                **{
                    v: {
                        k: s["metrics"][k]
                        for k in ("accuracy", "roc_auc", "recall_at_5pct_false_reject", "f1_defective")
                    }
                    for v, s in summary.items()
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli())
