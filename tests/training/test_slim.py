"""Slim files for a lent GPU: a checkpoint without optimizer state that still exports, ImageNet weights
that load through PVQC_IMAGENET_WEIGHTS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.network import IMAGENET_VARIABLE, WeightsError, build_classifier
from training.slim import cli, imagenet_weights, slim_checkpoint
from training.train import load_checkpoint, model_from_checkpoint, save_checkpoint

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


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"name,value\nconv,1\n", r"is not readable by torch\.load"),  # a CSV
        (b"PK\x03\x04" + b"\x00" * 64, r"is not readable by torch\.load"),  # a zip cut short
    ],
)
def test_imagenet_variable_naming_an_unreadable_file_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes, expected: str
) -> None:
    bad = tmp_path / "weights.pt"
    bad.write_bytes(content)
    monkeypatch.setenv(IMAGENET_VARIABLE, str(bad))
    with pytest.raises(WeightsError, match=expected) as caught:
        build_classifier("efficientnet_lite0")
    assert "expected efficientnet_lite0's ImageNet weights" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_imagenet_variable_naming_a_truncated_copy_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "whole.pt"
    torch.save({"a": torch.zeros(1000)}, whole)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    monkeypatch.setenv(IMAGENET_VARIABLE, str(cut))
    with pytest.raises(WeightsError, match=r"is not readable by torch\.load"):
        build_classifier("efficientnet_lite0")


def test_imagenet_variable_naming_something_else_saved_by_torch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], other)
    monkeypatch.setenv(IMAGENET_VARIABLE, str(other))
    with pytest.raises(WeightsError, match="holds a list, not a mapping of names to tensors"):
        build_classifier("efficientnet_lite0")


def fake_checkpoint(path: Path) -> Path:
    """A pvqc checkpoint with every key export reads, holding one tensor: enough to slim."""
    state = {
        "config": {"architecture": "efficientnet_lite0"},
        "model": {"w": torch.zeros(4)},
        "optimizer": {},
        "scheduler": {},
        "epoch": 0,
        "best_auc": 0.5,
        "history": [],
        "validation": {},
    }
    save_checkpoint(path, **state)
    return path


def test_slim_into_a_new_folder_makes_it(tmp_path: Path) -> None:
    source = fake_checkpoint(tmp_path / "last.pt")
    dest = tmp_path / "new" / "folder" / "slim.pt"
    assert cli(["checkpoint", str(source), str(dest)]) == 0
    assert "optimizer" not in load_checkpoint(dest)


def test_slim_into_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = fake_checkpoint(tmp_path / "last.pt")
    (tmp_path / "taken").write_text("a file")
    assert cli(["checkpoint", str(source), str(tmp_path / "taken" / "slim.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "expected DEST to be a writable file path" in err
    assert "\n" not in err
