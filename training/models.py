"""`pvqc models list | evaluate | promote | rollback | shadow`: the model registry from scripts.

Owns: the command line over `model.registry`, and `compare`, the candidate-against-active evaluation:
both models score the same held-out cells (the ELPV test split and the test modules of reviewed sets,
which training never saw), each at its own card's threshold; the report (`evaluation/report.json` and
`report.md` in the candidate's folder) gives the metrics side by side, the cells where they disagree
and which way each flips, and the promotion rule's verdict, which the registry records: `promote`
refuses a candidate that has no evaluation against the current active version or that the rule
refused (unless --force), and always refuses one whose card lacks fields or whose ONNX fails parity.

The rule (configurable): on either held-out set the candidate, with a review band that flags as many
functional cells as the active model's does, lets through no larger a share of defective cells than
the active model (escapes: defective cells judged functional, neither FAIL nor REVIEW), plus
`--max-escape-increase`; and on the reviewed test modules its accuracy is at least the active
model's plus `--min-reviewed-gain`. Comparing at equal review load keeps a band that flags everything
(no escapes, no PASS) from winning; each model's own escape rate and load are reported beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from datasets.elpv import DatasetError, ElpvCells
from datasets.reviewed import cell_groups
from model.card import CardError, ModelCard, read_card
from model.preprocess import lowest_per_cell
from model.registry import Registry, RegistryError, now_iso

log = logging.getLogger("training.models")
DEFAULT_ROOT = Path("models/pvqc-cell")
EVALUATION_DIR = "evaluation"
QUICK_REPORT = Path("quick-report")  # `evaluate --limit`: beside the full report, never instead of it


@dataclass(frozen=True)
class Rule:
    max_escape_increase: float = 0.0
    min_reviewed_gain: float = 0.0

    def describe(self) -> str:
        return (
            f"escape rate at the active model's review load <= active's + {self.max_escape_increase:g} "
            "on every held-out set; "
            f"reviewed accuracy >= active's + {self.min_reviewed_gain:g}"
        )


def predict_folder(folder: Path, card: ModelCard, images: np.ndarray, tta: bool) -> np.ndarray:
    """FP32 probabilities of a version for (N, S, S) cells, resized to its card's input size."""
    from model.onnx_export import ModelFileError, onnx_probabilities, onnx_session
    from model.preprocess import dihedral_view, resize_cell

    size = card.input.size
    if images.shape[-1] != size:
        images = np.stack([resize_cell(image, size) for image in images]) if len(images) else images
    try:
        session = onnx_session(card.onnx_path(folder, "fp32"))
    except ModelFileError as exc:  # a RegistryError, so `pvqc models` ends with one line, not a traceback
        raise RegistryError(f"cannot evaluate {folder.name}: {exc}") from exc
    views = range(8) if tta else range(1)
    return np.mean([onnx_probabilities(session, dihedral_view(images, v)) for v in views], axis=0)


def escape_rate(probabilities: np.ndarray, labels: np.ndarray, card: ModelCard) -> float | None:
    """Share of defective cells judged functional (below the review threshold): they would PASS."""
    defective = labels >= 0.5
    if not defective.any():
        return None
    return float((probabilities[defective] < card.operating_points.review_threshold).mean())


def review_load(probabilities: np.ndarray, labels: np.ndarray, card: ModelCard) -> float | None:
    """Share of functional cells flagged (FAIL or REVIEW): the work a model's band gives people."""
    functional = labels < 0.5
    if not functional.any():
        return None
    return float((probabilities[functional] >= card.operating_points.review_threshold).mean())


def escape_rate_at_load(probabilities: np.ndarray, labels: np.ndarray, load: float) -> float | None:
    """Escape rate of a model whose review threshold flags `load` of the functional cells.

    Two models with different REVIEW bands cannot be compared by their own escape rates: a band that
    flags every cell lets nothing escape. At the same review load, the comparison is of the models.
    The model gets its best band for that load: it flags what lies above its (k+1)-th most suspicious
    functional cell, k the functional cells the load allows, so a model compared with itself lets
    through no more than its own band does.
    """
    functional, defective = probabilities[labels < 0.5], probabilities[labels >= 0.5]
    if not len(functional) or not len(defective):
        return None
    allowed = int(np.floor(load * len(functional) + 1e-9))  # functional cells it may flag
    if allowed >= len(functional):
        return 0.0
    highest_unflagged = float(np.sort(functional)[::-1][allowed])
    return float((defective <= highest_unflagged).mean())


def held_out_sets(reviewed: list[Path], limit: int | None) -> dict[str, ElpvCells]:
    from datasets.reviewed import Part, load_reviewed
    from training.evaluate import test_cells

    sets = {"elpv_test": test_cells(limit)}
    for i, folder in enumerate(reviewed):
        cells = load_reviewed(folder, Part.TEST)
        if len(cells):
            sets[f"reviewed_test_{i}" if len(reviewed) > 1 else "reviewed_test"] = cells
        else:
            log.warning("reviewed set %s has no test modules yet", folder)
    return sets


def escape_check(
    probabilities: dict[str, np.ndarray], labels: np.ndarray, cards: dict[str, ModelCard], rule: Rule
) -> tuple[float | None, str | None]:
    """The rule's escape test on one held-out set: the candidate, at the active model's review load,
    lets through no more defective cells than the active model does (+ the allowed increase).

    Returns the candidate's escape rate at that load and the reason for a refusal (None: passed).
    """
    active_load = review_load(probabilities["active"], labels, cards["active"])
    if active_load is None:
        return None, None
    # both at their best band for that load: the active model's own band may sit anywhere between two
    # functional cells, and measuring only the candidate at its best would favour it
    active_escape = escape_rate_at_load(probabilities["active"], labels, active_load)
    candidate_escape = escape_rate_at_load(probabilities["candidate"], labels, active_load)
    if active_escape is None:
        return None, None
    if candidate_escape is not None and candidate_escape > active_escape + rule.max_escape_increase + 1e-12:
        return candidate_escape, (
            f"escape rate {candidate_escape:.4f} at the active model's review load ({active_load:.1%} of "
            f"functional cells) vs active {active_escape:.4f}"
        )
    return candidate_escape, None


def compare(
    registry: Registry,
    candidate: str,
    reviewed: list[Path],
    rule: Rule,
    limit: int | None = None,
    tta: bool = False,
) -> dict[str, Any]:
    """Score candidate and active on the same held-out cells; write the report; record the verdict."""
    folders = {"candidate": registry.folder(candidate)}
    active = registry.active()
    if active is not None and active != candidate:
        folders["active"] = registry.folder(active)
    cards = {role: read_card(folder) for role, folder in folders.items()}
    sets = held_out_sets(reviewed, limit)
    report: dict[str, Any] = {
        "candidate": candidate,
        "against": active if "active" in folders else None,
        "rule": rule.describe(),
        "evaluated_at": now_iso(),
        "tta_views": 8 if tta else 1,
        "sets": {},
    }
    # scikit-learn comes with the training extras only; list / promote / rollback work without it
    from training.metrics import classification_metrics

    reasons: list[str] = []
    for set_name, cells in sets.items():
        scored: dict[str, Any] = {}
        probabilities: dict[str, np.ndarray] = {}
        # one verdict per cell, as the line gets it: a half cell's two views give the lower probability
        first, groups = cell_groups(cells.names)
        labels, types, names = cells.probabilities[first], cells.types[first], cells.names[first]
        for role, folder in folders.items():
            card = cards[role]
            p = lowest_per_cell(predict_folder(folder, card, cells.images, tta), groups, len(first))
            probabilities[role] = p
            metrics = classification_metrics(p, labels, types, card.operating_points.threshold)
            metrics["escape_rate"] = escape_rate(p, labels, card)
            metrics["review_load"] = review_load(p, labels, card)
            scored[role] = {"version": card.version, "metrics": metrics}
        flips = []
        if "active" in folders:
            judged = {r: probabilities[r] >= cards[r].operating_points.threshold for r in folders}
            for i in np.flatnonzero(judged["candidate"] != judged["active"]):
                flips.append(
                    {
                        "name": str(names[i]),
                        "label": float(labels[i]),
                        "active": float(probabilities["active"][i]),
                        "candidate": float(probabilities["candidate"][i]),
                        "flip": "to_defective" if judged["candidate"][i] else "to_functional",
                        "correct_now": bool(judged["candidate"][i] == (labels[i] >= 0.5)),
                    }
                )
            a, c = scored["active"]["metrics"], scored["candidate"]["metrics"]
            at_load, refusal = escape_check(probabilities, labels, cards, rule)
            c["candidate_escape_rate_at_active_load"] = at_load
            if refusal is not None:
                reasons.append(f"{set_name}: {refusal}")
            if (
                set_name.startswith("reviewed")
                and c["accuracy"] < a["accuracy"] + rule.min_reviewed_gain - 1e-12
            ):
                reasons.append(
                    f"{set_name}: accuracy {c['accuracy']:.4f} < active {a['accuracy']:.4f} "
                    f"+ {rule.min_reviewed_gain:g}"
                )
        report["sets"][set_name] = {
            "cells": len(first),
            "models": scored,
            "disagreements": len(flips),
            "flips": flips,
        }
    promote = not reasons
    report["promote"] = promote
    report["reason"] = "; ".join(reasons) if reasons else "meets the rule"
    out = folders["candidate"] / EVALUATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    if limit is not None:
        # a quick look at part of the test split decides nothing: it keeps the full evaluation's report
        # and registry record, and says so
        report["promote"] = False
        report["reason"] = (
            f"a quick look at {limit} ELPV test cells (--limit) records no verdict; evaluate without "
            f"--limit to decide a promotion (on these cells: {report['reason']})"
        )
        (out / QUICK_REPORT.with_suffix(".json")).write_text(json.dumps(report, indent=1) + "\n")
        (out / QUICK_REPORT.with_suffix(".md")).write_text(markdown(report))
        return report
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    registry.record_evaluation(
        candidate,
        {
            "against": report["against"],
            "promote": promote,
            "reason": report["reason"],
            "rule": report["rule"],
            "at": report["evaluated_at"],
            "report": str(out / "report.json"),
        },
    )
    return report


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Candidate {report['candidate']} against {report['against'] or 'no active model'}",
        "",
        f"Rule: {report['rule']}. Verdict: **{'may be promoted' if report['promote'] else 'refused'}** "
        f"({report['reason']}).",
        "",
    ]
    keys = (
        "accuracy",
        "f1_defective",
        "roc_auc",
        "recall_at_5pct_false_reject",
        "escape_rate",
        "review_load",
        "candidate_escape_rate_at_active_load",
    )
    for set_name, result in report["sets"].items():
        roles = list(result["models"])
        lines += [
            f"## {set_name} ({result['cells']} cells, {result['disagreements']} disagreements)",
            "",
            "| metric | " + " | ".join(f"{r} {result['models'][r]['version']}" for r in roles) + " |",
            "| --- |" + " --- |" * len(roles),
        ]
        for key in keys:
            values = [result["models"][r]["metrics"].get(key) for r in roles]
            lines.append(
                f"| {key} | " + " | ".join("n/a" if v is None else f"{v:.4f}" for v in values) + " |"
            )
        if result["flips"]:
            lines += ["", "| cell | label | active | candidate | flip |", "| --- | --- | --- | --- | --- |"]
            for flip in result["flips"][:50]:
                lines.append(
                    f"| {flip['name']} | {flip['label']:.2f} | {flip['active']:.3f} | "
                    f"{flip['candidate']:.3f} | {flip['flip']} |"
                )
        lines.append("")
    return "\n".join(lines)


def list_versions(registry: Registry) -> list[dict[str, Any]]:
    rows = []
    for info in registry.versions():
        rows.append(
            {
                "version": info.version,
                "status": info.status.value,
                "shadow": info.shadow,
                "architecture": info.card.architecture if info.card else None,
                "test_accuracy": (
                    info.card.metrics.get("test", {}).get("fp32", {}).get("accuracy") if info.card else None
                ),
                "evaluation": info.evaluation,
                "problem": info.problem,
            }
        )
    return rows


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pvqc models", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root", type=Path, default=DEFAULT_ROOT, help="registry folder (default %(default)s)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="versions, their status, shadow and evaluation")
    evaluate = commands.add_parser("evaluate", help="score CANDIDATE against the active model")
    evaluate.add_argument("candidate")
    evaluate.add_argument("--reviewed", type=Path, action="append", default=[], help="reviewed export folder")
    evaluate.add_argument(
        "--limit",
        type=int,
        help="only the first N ELPV test cells: a quick look (quick-report.md) that records no verdict",
    )
    evaluate.add_argument("--tta", action="store_true", help="average over the 8 dihedral views")
    evaluate.add_argument("--max-escape-increase", type=float, default=0.0)
    evaluate.add_argument("--min-reviewed-gain", type=float, default=0.0)
    promote = commands.add_parser(
        "promote",
        help="make VERSION active (after the card and parity checks and, once a version is active, "
        "an evaluation against it)",
    )
    promote.add_argument("version")
    promote.add_argument(
        "--force",
        action="store_true",
        help="promote without an evaluation against the active version, or although it refused VERSION",
    )
    promote.add_argument("--note", default="")
    rollback = commands.add_parser("rollback", help="re-activate the version the last promotion replaced")
    rollback.add_argument("--note", default="")
    shadow = commands.add_parser("shadow", help="let VERSION score live frames beside the active model")
    shadow.add_argument("version", nargs="?", help="omit with --off")
    shadow.add_argument("--off", action="store_true", help="stop shadow scoring")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    registry = Registry(args.root)
    try:
        result: Any
        if args.command == "list":
            result = list_versions(registry)
        elif args.command == "evaluate":
            rule = Rule(args.max_escape_increase, args.min_reviewed_gain)
            report = compare(registry, args.candidate, args.reviewed, rule, args.limit, args.tta)
            result = {
                "candidate": report["candidate"],
                "against": report["against"],
                "promote": report["promote"],
                "reason": report["reason"],
                "report": str(
                    registry.folder(args.candidate)
                    / EVALUATION_DIR
                    / (f"{QUICK_REPORT}.md" if args.limit is not None else "report.md")
                ),
            }
        elif args.command == "promote":
            previous = registry.promote(args.version, force=args.force, note=args.note)
            result = {"active": args.version, "previous": previous}
        elif args.command == "rollback":
            result = {"active": registry.rollback(note=args.note)}
        else:
            if args.off == (args.version is not None):
                parser.error("shadow takes a VERSION or --off")
            registry.set_shadow(None if args.off else args.version)
            result = {"shadow": None if args.off else args.version}
    except (RegistryError, CardError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:  # the serving image has the base dependencies only
        print(
            f"error: pvqc models {args.command} needs the training extras ({exc.name or exc}): "
            "pip install '.[train]', or run it from a workstation on the same registry folder",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(result, indent=1 if args.command == "list" else None))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
