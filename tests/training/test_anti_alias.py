"""Blur pooling (anti_alias): it adds no weights, a release made with it loads back exactly, a run from a
release keeps the release's network (or adds the blur when asked), and dropping a release's blur or
resuming into the other network is refused in one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from timm.layers import BlurPool2d

from model.network import CellClassifier, WeightsError, load_released
from model.onnx_export import CAM_OUTPUT, INPUT_NAME, onnx_session
from tests.training.conftest import tiny_config
from training.config import ConfigError
from training.train import load_checkpoint, main, model_from_checkpoint


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


@pytest.mark.slow
def test_a_blurred_release_loads_back_into_the_network_exactly(blurred_release: Path) -> None:
    model = CellClassifier("efficientnet_lite0", anti_alias=True)
    load_released(model, blurred_release / "model.onnx")
    cells = np.load(blurred_release / "parity.npz")["cells"][:4]
    with torch.no_grad():
        _, ours = model.eval()(torch.from_numpy(cells).float()[:, None])
    session = onnx_session(blurred_release / "model.onnx")
    (graph,) = session.run([CAM_OUTPUT], {INPUT_NAME: cells.astype(np.float32)[:, None]})  # type: ignore[attr-defined]
    # float32 kernels of two runtimes, whose sums run in another order on another machine: an element near
    # zero of a map that reaches 30 is off by about 1e-4 (seen in CI), so the tolerance scales with the map;
    # a blur dropped or a layer swapped misses by whole units
    np.testing.assert_allclose(ours.numpy(), graph, rtol=1e-4, atol=2e-5 * float(np.abs(graph).max()))


@pytest.mark.slow
def test_a_run_from_a_release_keeps_its_network_or_adds_the_blur(
    blurred_release: Path, smoke_release: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="with blur pooling; anti_alias: false would drop it"):
        main(tiny_config(tmp_path / "a", init_from=str(blurred_release), anti_alias=False))
    with pytest.raises(WeightsError, match="has 4 blur pools, the network 0"):
        load_released(CellClassifier("efficientnet_lite0"), blurred_release / "model.onnx")
    # unset: the release's network, recorded so the checkpoint rebuilds it
    main(tiny_config(tmp_path / "kept", init_from=str(blurred_release)))
    assert model_from_checkpoint(load_checkpoint(tmp_path / "kept" / "last.pt")).anti_alias
    # asked for: the blur added to a release without it
    main(tiny_config(tmp_path / "added", init_from=str(smoke_release), anti_alias=True))
    assert model_from_checkpoint(load_checkpoint(tmp_path / "added" / "last.pt")).anti_alias


@pytest.mark.slow
def test_a_resume_into_the_other_network_is_refused(smoke_run: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="without blur pooling; the config says anti_alias: true"):
        main(tiny_config(tmp_path / "run", anti_alias=True), resume=smoke_run / "last.pt")
