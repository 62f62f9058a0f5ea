"""The consistency term: a divergence between the verdicts on a cell as stored and as a camera delivers it."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from model.network import bernoulli_js, soft_bce
from tests.training.conftest import tiny_config
from training.config import ConfigError, TrainConfig
from training.train import training_loss

logits = st.floats(min_value=-20, max_value=20, allow_nan=False)


@given(logits, logits)
def test_divergence_is_symmetric_bounded_and_zero_only_for_equal_verdicts(a: float, b: float) -> None:
    first, second = torch.tensor([a]), torch.tensor([b])
    forward, backward = float(bernoulli_js(first, second)), float(bernoulli_js(second, first))
    assert forward == pytest.approx(backward, abs=1e-7)
    assert -1e-7 <= forward <= math.log(2) + 1e-6
    assert float(bernoulli_js(first, first)) == pytest.approx(0.0, abs=1e-7)


def test_divergence_weighs_verdicts_that_straddle_the_middle_over_confident_ones() -> None:
    # the same logit gap of 1: around 0 the verdict flips, around 6 both copies say defective
    straddling = bernoulli_js(torch.tensor([-0.5]), torch.tensor([0.5]))
    confident = bernoulli_js(torch.tensor([5.5]), torch.tensor([6.5]))
    assert float(straddling) > 20 * float(confident)


def test_loss_without_consistency_is_the_plain_soft_bce() -> None:
    scores, targets = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([1.0, 0.0, 2 / 3])
    assert torch.equal(training_loss(scores, targets, 0.0), soft_bce(scores, targets))


def test_loss_with_consistency_scores_both_copies_against_their_own_cells_label() -> None:
    # batch order: every cell as stored, then every cell as the camera delivers it
    stored, camera = torch.tensor([-0.4, 0.2, 3.0]), torch.tensor([0.6, -0.9, 2.5])
    targets = torch.tensor([0.0, 2 / 3, 1.0])
    pairs = [(stored[i], targets[i]) for i in range(3)] + [(camera[i], targets[i]) for i in range(3)]
    bce = sum(float(F.binary_cross_entropy_with_logits(z, t)) for z, t in pairs) / len(pairs)
    divergences = [float(bernoulli_js(stored[i : i + 1], camera[i : i + 1])) for i in range(3)]
    expected = bce + 10.0 * sum(divergences) / 3
    assert training_loss(torch.cat([stored, camera]), targets, 10.0).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_loss_with_consistency_pulls_the_two_copies_together() -> None:
    stored = torch.tensor([-0.4, 0.2], requires_grad=True)
    camera = torch.tensor([0.6, -0.9], requires_grad=True)
    targets = torch.tensor([1 / 3, 2 / 3])
    loss = training_loss(torch.cat([stored, camera]), targets, 10.0)
    plain = soft_bce(torch.cat([stored, camera]), targets.repeat(2))
    assert loss.item() > plain.item()
    loss.backward()
    assert stored.grad is not None and camera.grad is not None
    # a small step along the gradient narrows the gap between the copies' logits
    step = 0.05
    gap_before = (camera - stored).abs()
    gap_after = ((camera - step * camera.grad) - (stored - step * stored.grad)).abs()
    assert torch.all(gap_after < gap_before)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"consistency": -1.0, "noise_sigma": 6.0}, "consistency must be a number >= 0"),
        ({"consistency": 10.0}, "consistency needs camera-like augmentation"),
        (
            {"consistency": 10.0, "noise_sigma": 6.0, "freeze_blocks": 2, "cache_frozen": True},
            "consistency cannot use cache_frozen inputs",
        ),
    ],
)
def test_consistency_settings_no_run_can_use_are_refused(values: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        TrainConfig(**values).validate()  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_run_with_consistency_trains_on_both_copies(tmp_path: Path) -> None:
    from training.train import main

    config = tiny_config(tmp_path, consistency=10.0, noise_sigma=6.0, limit_train=8, limit_validation=4)
    main(config)
    with (tmp_path / "metrics.csv").open() as rows:
        history = list(csv.DictReader(rows))
    assert len(history) == 1 and math.isfinite(float(history[0]["train_loss"]))
    assert (tmp_path / "best.pt").is_file()


@pytest.mark.slow
def test_a_resume_with_another_consistency_weight_is_refused(tmp_path: Path) -> None:
    from training.train import main

    settings = {"noise_sigma": 6.0, "epochs": 2, "limit_train": 4, "limit_validation": 4}
    main(tiny_config(tmp_path, consistency=10.0, **settings), stop_after=1)
    with pytest.raises(ConfigError, match=r"trained with consistency 10\.0; the config says 0\.0"):
        main(tiny_config(tmp_path, consistency=0.0, **settings), resume=tmp_path / "last.pt")
