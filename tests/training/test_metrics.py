"""Operating points: the review band stays within its budget of functional cells."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from training.metrics import REVIEW_FLAG_BUDGET, accuracy_threshold, flagged_share, review_threshold


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(0.0, 1.0, width=32), min_size=4, max_size=200),
    seed=st.integers(0, 2**16),
)
def test_review_band_flags_at_most_the_budget_of_functional_cells(scores: list[float], seed: int) -> None:
    probabilities = np.array(scores, dtype=np.float32)
    labels = np.random.default_rng(seed).choice([0.0, 1 / 3, 2 / 3, 1.0], len(scores))
    threshold = accuracy_threshold(probabilities, labels)
    review = review_threshold(probabilities, labels, threshold)
    assert 0 < review <= threshold
    _caught, bothered = flagged_share(probabilities, labels, review)
    if review < threshold and (labels < 0.5).any():
        assert bothered <= REVIEW_FLAG_BUDGET + 1e-9


def test_a_weak_model_gets_a_band_its_reviewers_can_work_through() -> None:
    # functional cells spread over 0..0.5, defective ones over 0.2..1: a wide overlap
    rng = np.random.default_rng(0)
    functional, defective = rng.uniform(0.0, 0.5, 900), rng.uniform(0.2, 1.0, 100)
    probabilities = np.concatenate([functional, defective]).astype(np.float32)
    labels = np.concatenate([np.zeros(900), np.ones(100)])
    review = review_threshold(probabilities, labels, 0.6)
    caught, bothered = flagged_share(probabilities, labels, review)
    assert 0.45 < review < 0.5  # the top 5% of functional scores lie above 0.475
    assert bothered <= 0.05 and caught > 0.5


def test_no_band_when_the_threshold_already_flags_more_than_the_budget() -> None:
    probabilities = np.array([0.9, 0.8, 0.7, 0.95, 0.1], dtype=np.float32)
    labels = np.array([0.0, 0.0, 0.0, 1.0, 1.0])
    assert review_threshold(probabilities, labels, 0.5) == 0.5
