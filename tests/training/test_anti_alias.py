"""Blur pooling (anti_alias): it adds no weights, a release made with it loads back exactly, and a run or
a resume that mixes networks with and without it is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers import BlurPool2d

from model.network import CellClassifier, load_released
from model.onnx_export import CAM_OUTPUT, INPUT_NAME, onnx_session
from tests.training.conftest import tiny_config
from training.config import ConfigError
from training.train import load_checkpoint, main, model_from_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def blurred_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-epoch run with blur pooling, exported as a release folder."""
    from training.export import main as export

    run = tmp_path_factory.mktemp("blurred-run")
    main(tiny_config(run, anti_alias=True))
    out = tmp_path_factory.mktemp("blurred-release")
    export(run / "best.pt", out, "0.0.0-blur", evaluate=False, tta=False, calibration_cells=16)
    return out


def test_blur_pooling_adds_no_weights() -> None:
    plain, blurred = (
        CellClassifier("efficientnet_lite0"),
        CellClassifier("efficientnet_lite0", anti_alias=True),
    )
    assert plain.state_dict().keys() == blurred.state_dict().keys()
    # one blur for each block that subsamples (the stem's own stride stays a plain convolution)
    assert sum(isinstance(m, BlurPool2d) for m in blurred.modules()) == 4
    assert not any(isinstance(m, BlurPool2d) for m in plain.modules())
    blurred.load_state_dict(plain.state_dict())
    grey = torch.rand(2, 1, 300, 300) * 255
    with torch.no_grad():
        # the feature maps: a fresh head's logits are all but zero whatever the network computes
        a = plain.eval().backbone.forward_features(plain.normalise(grey))
        b = blurred.eval().backbone.forward_features(blurred.normalise(grey))
    assert a.shape == b.shape
    assert not torch.allclose(a, b, rtol=1e-3, atol=1e-3)  # the same weights, another network


def test_a_blurred_release_loads_back_into_the_network_exactly(blurred_release: Path) -> None:
    model = CellClassifier("efficientnet_lite0", anti_alias=True)
    load_released(model, blurred_release / "model.onnx")
    cells = np.load(blurred_release / "parity.npz")["cells"][:4]
    with torch.no_grad():
        _, ours = model.eval()(torch.from_numpy(cells).float()[:, None])
    session = onnx_session(blurred_release / "model.onnx")
    (graph,) = session.run([CAM_OUTPUT], {INPUT_NAME: cells.astype(np.float32)[:, None]})  # type: ignore[attr-defined]
    np.testing.assert_allclose(ours.numpy(), graph, rtol=1e-4, atol=1e-4)


def test_starting_from_a_release_needs_the_same_network(
    blurred_release: Path, smoke_release: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="with blur pooling; set anti_alias: true to start from it"):
        main(tiny_config(tmp_path / "a", init_from=str(blurred_release)))
    with pytest.raises(ConfigError, match="without blur pooling; set anti_alias: false to start from it"):
        main(tiny_config(tmp_path / "b", init_from=str(smoke_release), anti_alias=True))
    main(tiny_config(tmp_path / "c", init_from=str(blurred_release), anti_alias=True))
    model = model_from_checkpoint(load_checkpoint(tmp_path / "c" / "last.pt"))
    assert model.anti_alias


def test_a_resume_into_the_other_network_is_refused(smoke_run: Path, tmp_path: Path) -> None:
    from model.network import WeightsError

    with pytest.raises(WeightsError, match="without blur pooling; the config says anti_alias: true"):
        main(tiny_config(tmp_path / "run", anti_alias=True), resume=smoke_run / "last.pt")
