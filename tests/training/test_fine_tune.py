"""Fine-tuning from a released model: its folded graph loads back exactly, the run keeps batch norms
frozen, and a folder that is no release is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model.card import SHIPPED_MODEL_DIR
from model.network import CellClassifier, WeightsError, load_released
from model.onnx_export import onnx_probabilities, onnx_session
from tests.training.conftest import tiny_config
from training.config import ConfigError
from training.train import load_checkpoint, main, set_train_mode

pytestmark = pytest.mark.slow


def random_cells(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 300, 300), dtype=np.uint8)


@pytest.mark.parametrize("which", ["shipped (Einsum head)", "fresh export (1x1 convolution head)"])
def test_a_released_graph_loads_back_into_the_network_exactly(which: str, smoke_release: Path) -> None:
    folder = SHIPPED_MODEL_DIR if which.startswith("shipped") else smoke_release
    model = CellClassifier("efficientnet_lite0")
    load_released(model, folder / "model.onnx")
    cells = random_cells(4)
    with torch.no_grad():
        ours, _ = model.eval()(torch.from_numpy(cells).float()[:, None])
    graph = onnx_probabilities(onnx_session(folder / "model.onnx"), cells)
    assert np.abs(ours.numpy() - graph).max() <= 1e-5


def test_a_graph_that_does_not_fit_the_network_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="does not fit efficientnet_lite2"):
        load_released(CellClassifier("efficientnet_lite2"), SHIPPED_MODEL_DIR / "model.onnx")
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(WeightsError, match="not a readable ONNX graph"):
        load_released(CellClassifier("efficientnet_lite0"), tmp_path / "model.onnx")


def test_training_mode_keeps_every_batch_norm_frozen_after_a_fold() -> None:
    model = CellClassifier("efficientnet_lite0")
    set_train_mode(model, 0, frozen_norms=True)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(norm.training for norm in norms)
    assert model.backbone.conv_stem.training  # the rest trains


def test_fine_tune_from_a_release_moves_the_weights_but_not_the_norms(
    smoke_release: Path, tmp_path: Path
) -> None:
    main(tiny_config(tmp_path, limit_train=8, limit_validation=8, init_from=str(smoke_release)))
    state = load_checkpoint(tmp_path / "last.pt")
    assert state["weights_source"].startswith("fine-tuned from pvqc-cell 0.0.0-test, the released graph")
    weights = state["model"]
    start = CellClassifier("efficientnet_lite0")
    load_released(start, smoke_release / "model.onnx")
    before = start.state_dict()
    assert not torch.equal(weights["backbone.conv_stem.weight"], before["backbone.conv_stem.weight"])
    statistics = [name for name in weights if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(weights[name], before[name]) for name in statistics)


def test_a_folder_that_is_no_release_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^init_from: .*expected a released model folder") as caught:
        main(tiny_config(tmp_path / "run", init_from=str(tmp_path)))
    assert "\n" not in str(caught.value)
