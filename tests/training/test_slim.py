"""Slim files for a lent GPU: a checkpoint without optimizer state that still exports, ImageNet weights
that load through PVQC_IMAGENET_WEIGHTS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.network import IMAGENET_VARIABLE, WeightsError, build_classifier
from training.slim import imagenet_weights, slim_checkpoint
from training.train import load_checkpoint, model_from_checkpoint

pytestmark = pytest.mark.slow


def test_slim_half_checkpoint_rebuilds_nearly_the_same_model(smoke_run: Path, tmp_path: Path) -> None:
    summary = slim_checkpoint(smoke_run / "best.pt", tmp_path / "slim.pt", half=True)
    assert summary["bytes"] < (smoke_run / "best.pt").stat().st_size / 3
    state = load_checkpoint(tmp_path / "slim.pt")
    assert "optimizer" not in state and "scheduler" not in state
    assert state["slim"] == {"half": True, "dropped": ["optimizer", "scheduler"]}
    # what export needs is all there
    assert state["validation"]["probabilities"] and state["config"]["architecture"] == "efficientnet_lite0"

    grey = torch.rand(2, 1, 300, 300) * 255
    full = model_from_checkpoint(load_checkpoint(smoke_run / "best.pt"))(grey)[0]
    slim = model_from_checkpoint(state)(grey)[0]
    assert torch.allclose(full, slim, atol=2e-2)


def test_imagenet_copy_loads_through_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    copy = tmp_path / "lite0.pt"
    imagenet_weights("efficientnet_lite0", copy, half=True)
    packaged, _ = build_classifier("efficientnet_lite0")
    monkeypatch.setenv(IMAGENET_VARIABLE, str(copy))
    copied, source = build_classifier("efficientnet_lite0")
    assert "through a copy" in source
    stem = copied.backbone.conv_stem.weight
    assert torch.allclose(stem, packaged.backbone.conv_stem.weight, atol=1e-3)


def test_imagenet_variable_naming_no_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(IMAGENET_VARIABLE, str(tmp_path / "nowhere.pt"))
    with pytest.raises(WeightsError, match="not a file"):
        build_classifier("efficientnet_lite0")


def test_imagenet_weights_for_an_unknown_architecture(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no ImageNet weights package"):
        imagenet_weights("resnet9000", tmp_path / "x.pt", half=False)
