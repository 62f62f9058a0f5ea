"""The promotion rule's escape test compares models at the same review load, not at their own bands."""

from __future__ import annotations

import numpy as np

from model.card import SHIPPED_MODEL_DIR, ModelCard, OperatingPoints, read_card
from training.models import Rule, escape_check, escape_rate_at_load, review_load

SHIPPED = SHIPPED_MODEL_DIR


def card_with(operating_points: OperatingPoints) -> ModelCard:
    return read_card(SHIPPED).model_copy(update={"operating_points": operating_points})


def scores(rng: np.random.Generator, separation: float) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities of 400 functional and 100 defective cells; larger separation, better model."""
    functional = rng.beta(2, 2 + separation, 400)
    defective = rng.beta(2 + separation, 2, 100)
    return np.concatenate([functional, defective]), np.concatenate([np.zeros(400), np.ones(100)])


def points(threshold: float, review: float) -> OperatingPoints:
    return OperatingPoints(threshold=threshold, review_threshold=review, threshold_rule="t", review_rule="r")


def test_escape_rate_at_a_models_own_load_is_its_escape_rate() -> None:
    p, labels = scores(np.random.default_rng(0), 4.0)
    card = card_with(points(0.5, 0.3))
    load = review_load(p, labels, card)
    assert load is not None
    own = float((p[labels >= 0.5] < 0.3).mean())
    at_load = escape_rate_at_load(p, labels, load)
    # its best band for that load: no more escapes than its own, and the same up to the defective
    # cells between its band and the functional cell just below it
    assert at_load is not None and own - 0.02 <= at_load <= own


def test_a_model_against_itself_is_never_refused() -> None:
    # 1.2.1 (1.2.0's FP32 graph, byte for byte) was refused against 1.2.0 by a quantile cut that
    # landed on the next functional cell above the band and counted the defective ones below it
    for seed in range(20):
        p, labels = scores(np.random.default_rng(seed), 3.0)
        review = float(np.random.default_rng(seed).uniform(0.1, 0.6))
        cards = {"active": card_with(points(0.6, review)), "candidate": card_with(points(0.6, review))}
        _at_load, refusal = escape_check({"active": p, "candidate": p}, labels, cards, Rule())
        assert refusal is None, f"seed {seed}: {refusal}"


def test_a_better_model_with_a_narrower_band_is_not_refused() -> None:
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.zeros(400), np.ones(100)])
    weak = np.where(labels >= 0.5, rng.uniform(0.02, 1.0, 500), rng.uniform(0.0, 0.6, 500))
    strong = np.where(labels >= 0.5, rng.uniform(0.3, 1.0, 500), rng.uniform(0.0, 0.5, 500))
    # the active band flags almost every good cell; the candidate's flags about one in ten
    cards = {"active": card_with(points(0.5, 0.05)), "candidate": card_with(points(0.5, 0.45))}
    probabilities = {"active": weak, "candidate": strong}
    # by their own bands the candidate lets more through: the wide band of the active one hides it
    assert (strong[labels >= 0.5] < 0.45).mean() > (weak[labels >= 0.5] < 0.05).mean()
    at_load, refusal = escape_check(probabilities, labels, cards, Rule())
    assert refusal is None and at_load == 0.0


def test_a_worse_model_is_refused_at_equal_load() -> None:
    rng = np.random.default_rng(2)
    good, labels = scores(rng, 6.0)
    poor = np.where(labels >= 0.5, rng.beta(2, 2, 500), rng.beta(2, 2, 500))  # no better than chance
    cards = {"active": card_with(points(0.5, 0.3)), "candidate": card_with(points(0.5, 0.3))}
    _at_load, refusal = escape_check({"active": good, "candidate": poor}, labels, cards, Rule())
    assert refusal is not None and "review load" in refusal


def test_both_models_are_measured_at_their_best_band_for_the_load() -> None:
    # the active band (0.45) sits well above its highest unflagged functional cell (0.1); a candidate
    # that lets 3 defective cells through at any band for that load must not pass because the
    # active model, measured at its own band, let 5 through that its best band would have caught
    labels = np.concatenate([np.zeros(100), np.ones(20)])
    functional = np.concatenate([np.full(90, 0.1), np.full(10, 0.5)])
    active = np.concatenate([functional, np.full(5, 0.2), np.full(15, 0.9)])
    candidate = np.concatenate([functional, np.full(3, 0.05), np.full(17, 0.9)])
    cards = {"active": card_with(points(0.6, 0.45)), "candidate": card_with(points(0.6, 0.45))}
    at_load, refusal = escape_check({"active": active, "candidate": candidate}, labels, cards, Rule())
    assert at_load == 0.15 and refusal is not None and "vs active 0.0000" in refusal
