"""Training: a one-epoch smoke run, resume, the cached-feature path, and two-process DDP under torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.training.conftest import tiny_config
from training.config import ConfigError
from training.train import (
    epoch_loss,
    epoch_order,
    load_checkpoint,
    main,
    model_from_checkpoint,
    save_checkpoint,
)

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


# two epochs of two batches on a few cells, the early blocks frozen: a run to stop and resume
SPLIT_RUN: dict[str, Any] = {
    "epochs": 2,
    "batch_size": 4,
    "freeze_blocks": 3,
    "limit_train": 8,
    "limit_validation": 4,
    "validation_views": 1,
}


def test_stop_and_resume_repeats_an_uninterrupted_run(tmp_path: Path) -> None:
    # the full network's input path: dihedral views, brightness jitter and camera noise from the
    # augmentation generator, dropout from the global RNG; all must draw in epoch 2 what they drew straight
    settings = {**SPLIT_RUN, "noise_sigma": 2.0, "drop_rate": 0.5}
    main(tiny_config(tmp_path / "straight", **settings))
    main(tiny_config(tmp_path / "split", **settings), stop_after=1)
    main(tiny_config(tmp_path / "split", **settings), resume=tmp_path / "split" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    drop = ("seconds",)
    assert [{k: v for k, v in row.items() if k not in drop} for row in straight["history"]] == [
        {k: v for k, v in row.items() if k not in drop} for row in resumed["history"]
    ]


EMA_SETTINGS: dict[str, Any] = {**SPLIT_RUN, "ema_decay": 0.5}


def test_weight_average_is_what_best_pt_keeps_and_a_resume_repeats_it(tmp_path: Path) -> None:
    main(tiny_config(tmp_path / "straight", **EMA_SETTINGS))
    main(tiny_config(tmp_path / "split", **EMA_SETTINGS), stop_after=1)
    main(tiny_config(tmp_path / "split", **EMA_SETTINGS), resume=tmp_path / "split" / "last.pt")
    straight = load_checkpoint(tmp_path / "straight" / "last.pt")
    resumed = load_checkpoint(tmp_path / "split" / "last.pt")
    assert straight["ema_steps"] == resumed["ema_steps"] == 4  # 2 epochs of 2 batches
    # the average trails the weights the optimizer moved: the two differ after a few steps
    raw = straight["training_model"]
    assert any(not torch.equal(straight["model"][n], t) for n, t in raw.items() if t.is_floating_point())
    for key in ("model", "training_model"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)


def test_resume_with_or_without_a_weight_average_against_the_checkpoint_is_refused(
    smoke_run: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=r"trained with ema_decay 0\.0; the config says 0\.5"):
        main(tiny_config(tmp_path / "run", ema_decay=0.5), resume=smoke_run / "last.pt")


def test_resume_with_another_weight_average_decay_is_refused(tmp_path: Path) -> None:
    main(tiny_config(tmp_path / "run", **{**EMA_SETTINGS, "limit_train": 4}), stop_after=1)
    with pytest.raises(ConfigError, match=r"trained with ema_decay 0\.5; the config says 0\.9"):
        main(
            tiny_config(tmp_path / "run", **{**EMA_SETTINGS, "limit_train": 4, "ema_decay": 0.9}),
            resume=tmp_path / "run" / "last.pt",
        )


def test_resume_with_another_schedule_is_refused(smoke_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scheduled for 1 epochs"):
        main(tiny_config(tmp_path, epochs=3), resume=smoke_run / "last.pt")


def test_resume_on_another_number_of_processes_is_refused_naming_it(smoke_run: Path, tmp_path: Path) -> None:
    # each process's share of an epoch depends on how many there are: the run would not repeat
    state = load_checkpoint(smoke_run / "last.pt")
    assert state["world_size"] == 1
    state["world_size"] = 2
    save_checkpoint(tmp_path / "two.pt", **{k: v for k, v in state.items() if k != "format"})
    with pytest.raises(ConfigError, match=r"trained on 2 process\(es\), this run has 1"):
        main(tiny_config(tmp_path / "run", epochs=1), resume=tmp_path / "two.pt")


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


def run_torchrun(command: list[str], logs: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run torchrun, ended at the timeout so that a hung rank fails the test instead of blocking it.

    Its output goes to files, not pipes: its workers live in sessions of their own and would hold a pipe
    open after torchrun ends. SIGTERM is what makes torchrun stop its workers before it exits.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs.mkdir()
    with (logs / "stdout").open("w") as stdout, (logs / "stderr").open("w") as stderr:
        process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            pytest.fail(f"torchrun did not end within {timeout} s (a rank waiting on another?)")
    return subprocess.CompletedProcess(
        command, process.returncode, (logs / "stdout").read_text(), (logs / "stderr").read_text()
    )


def test_torchrun_two_cpu_processes_with_an_odd_number_of_cells(tmp_path: Path) -> None:
    # 9 cells in batches of 4: split 5 / 4, rank 0 would run 2 batches and rank 1 one, and rank 0 would
    # wait forever in the second batch's all-reduce; padded to 5 / 5, both run 2
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "training.train",
        "--set", "epochs=1", "batch_size=4", "limit_train=9", "limit_validation=4", "threads=1",
        "validation_views=1", "freeze_blocks=3", f"out_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    done = run_torchrun(command, tmp_path / "logs", timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2" in done.stderr
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 0
    assert state["scheduler"]["last_epoch"] == 2  # ceil(ceil(9 / 2) / 4) steps on every rank
    # one result line for the run, not one per rank
    assert [line for line in done.stdout.splitlines() if line.startswith("{")] == [
        json.dumps({"out_dir": str(tmp_path / "run"), "best_val_auc": state["best_auc"], "epochs": 1})
    ]


def test_every_rank_gets_as_many_cells_and_together_all_of_them() -> None:
    weights = np.ones(9)
    shares = [epoch_order(weights, False, seed=0, epoch=3, rank=rank, world=4) for rank in range(4)]
    assert [len(share) for share in shares] == [3, 3, 3, 3]
    assert set(torch.cat(shares).tolist()) == set(range(9))
    # the same epoch draws the same order, another epoch another one
    again = epoch_order(weights, False, seed=0, epoch=3, rank=0, world=4)
    assert torch.equal(again, shares[0])
    epoch_3, epoch_4 = (epoch_order(weights, False, seed=0, epoch=e, rank=0, world=1) for e in (3, 4))
    assert not torch.equal(epoch_3, epoch_4)
    # fewer cells than ranks: each rank still gets one
    assert [len(epoch_order(np.ones(1), False, 0, 0, rank, 2)) for rank in range(2)] == [1, 1]


def _reduce_loss(rank: int, init_file: str, results: Any) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    # rank 0: 3 cells of loss 1.0; rank 1: one cell of loss 5.0 -> (3 + 5) / 4 over the whole epoch
    running, seen = (3.0, 3) if rank == 0 else (5.0, 1)
    results[rank] = epoch_loss(running, seen, 2, torch.device("cpu"))
    dist.destroy_process_group()


def test_logged_training_loss_is_the_whole_epochs(tmp_path: Path) -> None:
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_reduce_loss, args=(str(tmp_path / "init"), results), nprocs=2, join=True)
    assert dict(results) == {0: 2.0, 1: 2.0}


def test_training_hardware_names_the_device_and_a_resume_elsewhere() -> None:
    from training.train import training_hardware

    here = training_hardware(torch.device("cpu"), 2)
    assert here.startswith("2 CPU process(es) on ") and "cores" in here
    assert training_hardware(torch.device("cpu"), 2, here) == here  # resumed on the same machine
    moved = training_hardware(torch.device("cpu"), 2, "1 x NVIDIA H100 80GB HBM3")
    assert moved == f"1 x NVIDIA H100 80GB HBM3; resumed on {here}"
