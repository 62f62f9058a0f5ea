"""Fixtures for the training tests: one tiny real training run shared by the session."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.config import TrainConfig


def tiny_config(out_dir: Path, **overrides: object) -> TrainConfig:
    """One epoch on a few dozen real ELPV cells at the native 300 px."""
    values: dict[str, object] = {
        "epochs": 1,
        "batch_size": 8,
        "limit_train": 24,
        "limit_validation": 16,
        "out_dir": str(out_dir),
    }
    values.update(overrides)
    config = TrainConfig(**values)  # type: ignore[arg-type]
    config.validate()
    return config


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a one-epoch smoke training (full network, no freezing, no cache)."""
    from training.train import main

    out = tmp_path_factory.mktemp("smoke-run")
    main(tiny_config(out))
    return out


@pytest.fixture(scope="session")
def smoke_release(smoke_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smoke checkpoint exported as a release folder (FP32 + INT8 + card)."""
    from training.export import main

    out = tmp_path_factory.mktemp("smoke-release")
    main(smoke_run / "best.pt", out, "0.0.0-test", evaluate=False, tta=False, calibration_cells=16)
    return out
