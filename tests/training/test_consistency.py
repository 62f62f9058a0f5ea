"""The stability term: its loss, and the ramp that keeps it from swamping an untrained network."""

from __future__ import annotations

import pytest
import torch

from model.network import STABLE_LOGIT_RANGE, consistency_loss
from training.train import CONSISTENCY_RAMP, ramped


def test_agreeing_renderings_cost_nothing() -> None:
    logits = torch.tensor([-3.0, 0.2, 4.0])
    assert float(consistency_loss(logits, logits.clone())) == 0.0


def test_differences_beyond_any_verdict_are_free() -> None:
    far = STABLE_LOGIT_RANGE + 5
    assert float(consistency_loss(torch.tensor([far, -far]), torch.tensor([far + 3, -far - 7]))) == 0.0
    assert float(consistency_loss(torch.tensor([0.5]), torch.tensor([-0.5]))) == pytest.approx(1.0)


def test_only_the_first_rendering_learns() -> None:
    logits = torch.tensor([0.5, -1.0], requires_grad=True)
    twin = torch.tensor([1.0, -2.0], requires_grad=True)
    consistency_loss(logits, twin).backward()
    assert logits.grad is not None and twin.grad is None


def test_weight_climbs_over_the_ramp_then_holds() -> None:
    total = 1000
    end = int(CONSISTENCY_RAMP * total)
    assert ramped(0.3, 0, total) == 0.0
    assert ramped(0.3, end // 2, total) == pytest.approx(0.15, rel=0.01)
    assert ramped(0.3, end, total) == pytest.approx(0.3)
    assert ramped(0.3, total, total) == pytest.approx(0.3)
