"""Training: a one-epoch smoke run, resume, the cached-feature path, and two-process DDP under torchrun."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.conftest import tiny_config
from training.config import ConfigError
from training.train import load_checkpoint, main, model_from_checkpoint

pytestmark = pytest.mark.slow


def test_smoke_run_writes_checkpoints_metrics_and_tensorboard(smoke_run: Path) -> None:
    for name in ("best.pt", "last.pt", "metrics.csv", "config.json"):
        assert (smoke_run / name).is_file(), name
    assert any((smoke_run / "tensorboard").iterdir())
    rows = list(csv.DictReader((smoke_run / "metrics.csv").open()))
    assert len(rows) == 1 and float(rows[0]["train_loss"]) > 0


def test_checkpoint_rebuilds_the_model_on_its_own(smoke_run: Path) -> None:
    state = load_checkpoint(smoke_run / "best.pt")
    model = model_from_checkpoint(state)
    probability, cam = model(torch.full((2, 1, 300, 300), 128.0))
    assert probability.shape == (2,) and cam.shape == (2, 10, 10)
    # the validation predictions that choose the thresholds travel with the checkpoint
    assert len(state["validation"]["probabilities"]) == 16


def test_resume_continues_from_the_next_epoch(tmp_path: Path) -> None:
    settings = {
        "epochs": 2,
        "freeze_blocks": 3,
        "cache_frozen": True,
        "limit_train": 8,
        "limit_validation": 8,
    }
    main(tiny_config(tmp_path, **settings), stop_after=1)  # a run split over two sessions
    assert load_checkpoint(tmp_path / "last.pt")["epoch"] == 0
    result = main(tiny_config(tmp_path, **settings), resume=tmp_path / "last.pt")
    assert result["epochs"] == 2
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert load_checkpoint(tmp_path / "last.pt")["scheduler"]["last_epoch"] == 2  # one step per batch
    # best.pt holds the epoch with the best validation AUC, whichever process ran it
    best = load_checkpoint(tmp_path / "best.pt")
    aucs = [float(row["val_auc"]) for row in rows]
    assert best["epoch"] == aucs.index(max(aucs)) and best["best_auc"] == max(aucs)


def test_resume_with_another_schedule_is_refused(smoke_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scheduled for 1 epochs"):
        main(tiny_config(tmp_path, epochs=3), resume=smoke_run / "last.pt")


def test_frozen_blocks_with_cached_features(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, freeze_blocks=3, cache_frozen=True, limit_train=16, limit_validation=8)
    before = load_frozen_stem()
    main(config)
    after = load_checkpoint(tmp_path / "last.pt")["model"]["backbone.conv_stem.weight"]
    assert torch.equal(before, after), "frozen blocks must keep their ImageNet weights"


def load_frozen_stem() -> torch.Tensor:
    from model.network import build_classifier

    model, _ = build_classifier("efficientnet_lite0")
    return model.backbone.conv_stem.weight.detach().clone()


def test_torchrun_two_cpu_processes(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "training.train",
        "--set", "epochs=1", "batch_size=4", "limit_train=16", "limit_validation=8", "threads=1",
        f"out_dir={tmp_path}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stderr
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["epoch"] == 0


def test_training_hardware_names_the_device_and_a_resume_elsewhere() -> None:
    from training.train import training_hardware

    here = training_hardware(torch.device("cpu"), 2)
    assert here.startswith("2 CPU process(es) on ") and "cores" in here
    assert training_hardware(torch.device("cpu"), 2, here) == here  # resumed on the same machine
    moved = training_hardware(torch.device("cpu"), 2, "1 x NVIDIA H100 80GB HBM3")
    assert moved == f"1 x NVIDIA H100 80GB HBM3; resumed on {here}"
