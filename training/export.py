"""Export a checkpoint as a released model: `python -m training.export --checkpoint best.pt --out DIR`.

Writes into DIR: `model.onnx` (FP32), `model-int8.onnx` (static INT8, calibrated on training cells),
and `card.json` with the operating points chosen on the validation split (never the test split), the
parity figure, provenance and licence. `--evaluate` then scores both files on the test split and puts
the metrics in the card and a report beside it.

`--from-release DIR` instead makes a new release from DIR's FP32 graph, byte for byte, with the INT8
graph quantized again by this code: a quantization fix needs no checkpoint, which may be on another
machine (`python -m training.export --from-release models/pvqc-cell/1.2.1 --out ... --version 1.2.2`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from datasets.elpv import (
    DatasetError,
    ElpvCells,
    elpv_root,
    load_elpv,
    read_labels,
    split_file_sha256,
    split_indices,
)
from datasets.reviewed import reviewed_provenance
from model.card import CardError, InputSpec, ModelCard, OperatingPoints, TensorSpec, read_card, write_card
from model.network import WeightsError
from model.onnx_export import (
    CAM_OUTPUT,
    INPUT_NAME,
    PROBABILITY_OUTPUT,
    ExportError,
    check_parity,
    export_onnx,
    quantize_int8,
)
from training.evaluate import ReportError
from training.metrics import REVIEW_FLAG_BUDGET, accuracy_threshold, flagged_share, review_threshold
from training.train import load_checkpoint, model_from_checkpoint, os_problem

log = logging.getLogger("training.export")
MODEL_NAME = "pvqc-cell"
FP32_FILE = "model.onnx"
INT8_FILE = "model-int8.onnx"
PARITY_FILE = "parity.npz"  # reference cells + PyTorch probabilities: promotion re-runs them on the ONNX
CALIBRATION_CELLS = 256
PARITY_CELLS = 64
REFERENCE_CELLS = 16  # kept in parity.npz (about 0.6 MB): the release stays under its size budget


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def release_hashes(out: Path) -> dict[str, str]:
    """The card's record of the ONNX files it describes; promotion checks them."""
    return {name: sha256(out / name) for name in (FP32_FILE, INT8_FILE)}


def exporting_machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''}".strip()


def operating_points(probabilities: np.ndarray, labels: np.ndarray, how: str) -> OperatingPoints:
    """Threshold and review threshold from validation probabilities obtained `how`."""
    threshold = accuracy_threshold(probabilities, labels)
    review = review_threshold(probabilities, labels, threshold)
    caught, bothered = flagged_share(probabilities, labels, review)
    return OperatingPoints(
        threshold=threshold,
        review_threshold=review,
        threshold_rule=f"best accuracy on the validation split ({len(labels)} cells, {how})",
        review_rule=(
            f"lowest threshold that flags (FAIL or REVIEW) at most {REVIEW_FLAG_BUDGET:.0%} of functional "
            f"validation cells; on validation it flags {caught:.1%} of defective and {bothered:.1%} of "
            "functional cells; cells between it and the threshold are uncertain"
        ),
    )


def build_card(
    state: dict[str, Any], version: str, points: OperatingPoints, parity: float, notes: str = ""
) -> ModelCard:
    config = state["config"]
    size = int(config["image_size"])
    history = state["history"]
    return ModelCard(
        name=MODEL_NAME,
        version=version,
        architecture=config["architecture"],
        input=InputSpec(
            tensor=TensorSpec(name=INPUT_NAME, shape=["batch", 1, size, size], datatype="FP32"),
            size=size,
            colour="grey",
        ),
        outputs=[
            TensorSpec(name=PROBABILITY_OUTPUT, shape=["batch"], datatype="FP32"),
            TensorSpec(name=CAM_OUTPUT, shape=["batch", "h", "w"], datatype="FP32"),
        ],
        classes={
            PROBABILITY_OUTPUT: "probability that the cell is defective (ELPV probability >= 0.5)",
            CAM_OUTPUT: "class activation map: the defect logit at each position of the last feature map",
        },
        operating_points=points,
        metrics={
            # the exported epoch's own figure (last.pt need not hold the run's best) beside the run's best
            "validation_auc": exported_epoch_auc(history),
            "validation_best_auc": state["best_auc"],
            "onnx_parity_max_abs": parity,
        },
        provenance={
            "weights": state.get("weights_source", "unknown"),
            # a fine-tune of a release (init_from): which one, and what it had learned from
            "started_from": state.get("started_from"),
            "training_data": "ELPV (elpv-dataset package), fixed split of DESIGN.md"
            + (" + reviewed modules (pvqc export-reviewed)" if config.get("reviewed_sets") else ""),
            "reviewed_sets": state.get("reviewed_sets")
            or reviewed_provenance(config.get("reviewed_sets", []), config.get("reviewed_weights", [])),
            "test_split_sha256": split_file_sha256(),
            "config": config,
            "epochs_run": len(history),
            "seconds_training": round(sum(row["seconds"] for row in history), 1),
            # checkpoints from before training recorded it say only where the export ran
            "hardware": state.get("training_hardware") or "not recorded by the checkpoint",
            "exported_on": exporting_machine(),
            "git_commit": git_commit(),
            "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "notes": notes,
        },
        files={"fp32": FP32_FILE, "int8": INT8_FILE},
    )


def exported_epoch_auc(history: list[dict[str, float]]) -> float | None:
    """The validation AUC of the epoch a checkpoint holds (its history's last row); None where there is
    none to tell (no rows, or NaN on a validation set of one class)."""
    if not history or math.isnan(history[-1]["val_auc"]):
        return None
    return history[-1]["val_auc"]


def write_parity_reference(model: Any, path: Path, cells: np.ndarray) -> Path:
    """Cells and PyTorch's probabilities for them; `model.registry` re-runs them before a promotion."""
    import torch

    with torch.no_grad():
        expected = model(torch.from_numpy(cells.astype(np.float32))[:, None])[0].numpy()
    np.savez_compressed(path, cells=cells, probabilities=expected.astype(np.float32))
    return path


def validation_as_served(
    validation: dict[str, Any], fp32: Path, root: Path
) -> tuple[np.ndarray, np.ndarray, str]:
    """Validation probabilities the way the service computes them: the exported graph, one view.

    The checkpoint's own validation probabilities may average several dihedral views; operating points
    chosen on those would not be the ones the line gets. When the validation cells are not all ELPV
    cells (reviewed modules joined them) the checkpoint's figures are used and the rule says so.
    """
    labels = np.asarray(validation["labels"])
    names, _, _ = read_labels(root / "labels.csv")
    position = {name: i for i, name in enumerate(names.tolist())}
    wanted = [position.get(name) for name in validation["names"]]
    if any(i is None for i in wanted):
        from datasets.reviewed import cell_groups
        from model.preprocess import lowest_per_cell

        # one verdict per cell, as the line gets it: a reviewed half cell's two views give the lower
        first, groups = cell_groups(np.asarray(validation["names"]))
        probabilities = lowest_per_cell(np.asarray(validation["probabilities"]), groups, len(first))
        views = validation.get("views", 8)
        return probabilities, labels[first], f"checkpoint's {views}-view average, per cell"
    from training.evaluate import predict

    cells = load_elpv(root, np.array(wanted, dtype=int))
    return predict(fp32, cells.images, tta=False), labels, "single view through the exported graph, as served"


def check_out_folder(out: Path) -> None:
    """Refuse a release folder that is a file before minutes of export work are spent."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; expected a folder for the release (existing or new)")


def main(
    checkpoint: Path,
    out: Path,
    version: str,
    evaluate: bool,
    tta: bool,
    calibration_cells: int = CALIBRATION_CELLS,
    notes: str = "",
) -> ModelCard:
    check_out_folder(out)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    size = int(state["config"]["image_size"])
    root = elpv_root()
    calibration = calibration_set(root, calibration_cells)
    fp32 = export_onnx(model, out / FP32_FILE, size)
    parity = check_parity(model, fp32, calibration.images[:PARITY_CELLS])
    log.info("ONNX parity on %d real cells: max |dp| = %.2e", PARITY_CELLS, parity)
    write_parity_reference(model, out / PARITY_FILE, calibration.images[:REFERENCE_CELLS])
    quantize_int8(fp32, out / INT8_FILE, calibration.images)
    probabilities, labels, how = validation_as_served(state["validation"], fp32, root)
    card = build_card(state, version, operating_points(probabilities, labels, how), parity, notes)
    card.provenance["sha256"] = release_hashes(out)
    write_card(card, out)
    if evaluate:
        from training.evaluate import evaluate_release

        card = evaluate_release(out, out / "report", tta=tta)
    return card


def calibration_set(root: Path, count: int) -> ElpvCells:
    """The seeded training cells INT8 calibration and parity use: the test split decides nothing."""
    _, probabilities, types = read_labels(root / "labels.csv")
    train_idx, _, _ = split_indices(probabilities, types)
    rng = np.random.default_rng(0)
    return load_elpv(root, np.sort(rng.choice(train_idx, min(count, len(train_idx)), replace=False)))


def requantize(
    source: Path,
    out: Path,
    version: str,
    evaluate: bool,
    tta: bool,
    calibration_cells: int = CALIBRATION_CELLS,
    notes: str = "",
) -> ModelCard:
    """A release with `source`'s FP32 graph and parity reference unchanged and a new INT8 graph.

    The card keeps the source's operating points (chosen on validation through the same FP32 graph)
    and provenance, says where the INT8 graph came from, and drops the source's test metrics until
    `evaluate` measures this release's own.
    """
    check_out_folder(out)
    card = read_card(source)
    if out.resolve() == source.resolve():
        raise ExportError(f"expected --out to be a new release folder, not the source {source}")
    if card.version == version:
        raise ExportError(f"expected a new version for the requantized release, not {source}'s {version}")
    out.mkdir(parents=True, exist_ok=True)
    fp32 = out / FP32_FILE
    shutil.copyfile(card.onnx_path(source, "fp32"), fp32)
    if (source / PARITY_FILE).is_file():
        shutil.copyfile(source / PARITY_FILE, out / PARITY_FILE)
    quantize_int8(fp32, out / INT8_FILE, calibration_set(elpv_root(), calibration_cells).images)
    provenance = {
        **card.provenance,
        "requantized_from": f"{card.name} {card.version}: its FP32 graph, byte for byte",
        "git_commit": git_commit(),
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "exported_on": exporting_machine(),
        "notes": " ".join(part for part in (str(card.provenance.get("notes", "")), notes) if part),
        "sha256": release_hashes(out),
    }
    # the source's test figures are of its own INT8 graph: this release earns its own by evaluating
    metrics = {key: value for key, value in card.metrics.items() if key not in ("test", "test_tta_views")}
    files = {"fp32": FP32_FILE, "int8": INT8_FILE}  # the names written here, whatever the source used
    release = card.model_copy(
        update={"version": version, "provenance": provenance, "metrics": metrics, "files": files}
    )
    write_card(release, out)
    if evaluate:
        from training.evaluate import evaluate_release

        release = evaluate_release(out, out / "report", tta=tta)
    return release


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a training checkpoint (best.pt, or a slim copy)")
    source.add_argument(
        "--from-release", type=Path, help="a release whose FP32 graph is kept and whose INT8 graph is redone"
    )
    parser.add_argument("--out", type=Path, required=True, help="release folder to write")
    parser.add_argument("--version", required=True, help="model version, e.g. 1.0.0")
    parser.add_argument("--evaluate", action="store_true", help="score FP32 and INT8 on the test split")
    parser.add_argument(
        "--calibration-cells", type=int, default=CALIBRATION_CELLS, help="training cells for INT8 calibration"
    )
    parser.add_argument("--notes", default="", help="how and where it was trained, for the card")
    parser.add_argument("--no-tta", dest="tta", action="store_false", help="single view instead of 8")
    args = parser.parse_args(argv)
    if args.calibration_cells < 1:
        # no cells would leave the INT8 quantizer without ranges and the parity check without cells
        parser.error(f"--calibration-cells expects >= 1 training cells, got {args.calibration_cells}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        make, source = (requantize, args.from_release) if args.from_release else (main, args.checkpoint)
        card = make(
            source, args.out, args.version, args.evaluate, args.tta, args.calibration_cells, args.notes
        )
    except (WeightsError, DatasetError, ExportError, CardError, ReportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # --out naming a file, a disk that is full, a release file not readable
        print(f"error: {os_problem(exc)}; expected --out to be a folder for the release", file=sys.stderr)
        return 2
    print(json.dumps({"out": str(args.out), "version": card.version, "metrics": card.metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
