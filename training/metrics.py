"""Metrics of DESIGN.md's evaluation protocol and the choice of operating points.

Owns: accuracy at a threshold, F1 of the defective class, ROC-AUC, recall of defective cells at a 5 %
false-reject rate, accuracy per cell type, 4-grade accuracy, and the validation-split rules that pick the
shipped threshold and the stricter REVIEW threshold.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

GRADES = np.array([0.0, 1 / 3, 2 / 3, 1.0])
FALSE_REJECT_BUDGET = 0.05
# at most this share of functional validation cells is flagged (FAIL or REVIEW): the review queue's size
REVIEW_FLAG_BUDGET = 0.05


def recall_at_false_reject(
    defective: np.ndarray, scores: np.ndarray, budget: float = FALSE_REJECT_BUDGET
) -> float:
    """Highest share of defective cells caught while flagging at most `budget` of functional cells."""
    fpr, tpr, _ = roc_curve(defective, scores)
    return float(tpr[fpr <= budget].max())


def nearest_grade(values: np.ndarray) -> np.ndarray:
    return GRADES[np.abs(values[:, None] - GRADES[None, :]).argmin(axis=1)]


def classification_metrics(
    probabilities: np.ndarray, labels: np.ndarray, types: np.ndarray, threshold: float
) -> dict[str, Any]:
    """All protocol metrics for predicted probabilities against ELPV's soft labels."""
    defective = labels >= 0.5
    predicted = probabilities >= threshold
    per_type = {
        str(t): float((predicted[types == t] == defective[types == t]).mean())
        for t in sorted(set(types.tolist()))
    }
    both_classes = 0 < defective.sum() < len(defective)
    return {
        "cells": len(labels),
        "threshold": float(threshold),
        "accuracy": float((predicted == defective).mean()),
        "f1_defective": float(f1_score(defective, predicted, zero_division=0)),
        "roc_auc": float(roc_auc_score(defective, probabilities)) if both_classes else None,
        "recall_at_5pct_false_reject": recall_at_false_reject(defective, probabilities)
        if both_classes
        else None,
        "accuracy_per_type": per_type,
        "grade4_accuracy": float((nearest_grade(probabilities) == nearest_grade(labels)).mean()),
        "confusion": {
            "true_functional": int((~predicted & ~defective).sum()),
            "false_defective": int((predicted & ~defective).sum()),
            "false_functional": int((~predicted & defective).sum()),
            "true_defective": int((predicted & defective).sum()),
        },
    }


def accuracy_threshold(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The threshold with the best accuracy on these (validation) cells; ties go to the middle of the run."""
    defective = labels >= 0.5
    candidates = np.unique(np.concatenate([probabilities, [0.5]]))
    accuracies = np.array([((probabilities >= t) == defective).mean() for t in candidates])
    best = np.flatnonzero(accuracies == accuracies.max())
    # a plateau of equally good thresholds: take its middle, away from both edges
    return float(np.clip(candidates[best[len(best) // 2]], 0.01, 0.99))


def review_threshold(
    probabilities: np.ndarray, labels: np.ndarray, threshold: float, budget: float = REVIEW_FLAG_BUDGET
) -> float:
    """The lowest threshold that flags (as FAIL or REVIEW) at most `budget` of functional validation cells.

    A REVIEW band sized by what it catches alone grows without bound on a weak model (98% recall
    once meant 0.005 and 93% of good cells in review, so no 60-cell module could ever pass); sized by
    the share of good cells it sends to people, it stays a queue that engineers can work through, and
    the recall it buys is written beside it. When the threshold alone already flags more than
    `budget`, there is no band: the review threshold equals the threshold.
    """
    functional = np.sort(probabilities[labels < 0.5])[::-1]  # highest first
    allowed = int(np.floor(budget * len(functional)))
    if allowed >= len(functional):
        return float(np.clip(0.005, 0.0, threshold))
    # just above the first functional cell that must stay below the band
    lowest = float(np.nextafter(np.float32(functional[allowed]), np.float32(1.0)))
    return float(np.clip(lowest, 0.005, threshold))


def flagged_share(probabilities: np.ndarray, labels: np.ndarray, review: float) -> tuple[float, float]:
    """(share of defective cells flagged, share of functional cells flagged) at the review threshold."""
    defective = labels >= 0.5
    flagged = probabilities >= review
    caught = float(flagged[defective].mean()) if defective.any() else float("nan")
    bothered = float(flagged[~defective].mean()) if (~defective).any() else float("nan")
    return caught, bothered
