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
from model.onnx_export import CAM_OUTPUT, INPUT_NAME, onnx_session
from tests.training.conftest import tiny_config
from training.config import ConfigError
from training.train import load_checkpoint, main, set_train_mode

pytestmark = pytest.mark.slow


def release_cells(folder: Path) -> np.ndarray:
    """The real ELPV cells a release keeps for its parity check."""
    return np.load(folder / "parity.npz")["cells"][:6]


@pytest.mark.parametrize("which", ["shipped (Einsum head)", "fresh export (1x1 convolution head)"])
def test_a_released_graph_loads_back_into_the_network_exactly(which: str, smoke_release: Path) -> None:
    folder = SHIPPED_MODEL_DIR if which.startswith("shipped") else smoke_release
    model = CellClassifier("efficientnet_lite0")
    load_released(model, folder / "model.onnx")
    cells = release_cells(folder)
    with torch.no_grad():
        _, ours = model.eval()(torch.from_numpy(cells).float()[:, None])
    # the logit maps, not probabilities: a probability near 0 or 1 hides a wrong logit
    session = onnx_session(folder / "model.onnx")
    (graph,) = session.run([CAM_OUTPUT], {INPUT_NAME: cells.astype(np.float32)[:, None]})  # type: ignore[attr-defined]
    # float32 kernels of two runtimes through 49 layers: agreement to 1e-4 relative (a swapped layer or
    # a head bias off by 1 misses by far more)
    np.testing.assert_allclose(ours.numpy(), graph, rtol=1e-4, atol=1e-4)


def test_a_graph_that_does_not_fit_the_network_is_refused(tmp_path: Path) -> None:
    import onnx

    with pytest.raises(WeightsError, match="does not fit efficientnet_lite2"):
        load_released(CellClassifier("efficientnet_lite2"), SHIPPED_MODEL_DIR / "model.onnx")
    (tmp_path / "model.onnx").write_bytes(b"not a graph")
    with pytest.raises(WeightsError, match="not a readable ONNX graph"):
        load_released(CellClassifier("efficientnet_lite0"), tmp_path / "model.onnx")
    unfolded = onnx.load(str(SHIPPED_MODEL_DIR / "model.onnx"))
    first = next(node for node in unfolded.graph.node if node.op_type == "Conv")
    del first.input[2]  # a convolution without its bias: an export that kept its batch norms
    onnx.save(unfolded, str(tmp_path / "unfolded.onnx"))
    with pytest.raises(WeightsError, match="has no bias, so its batch norm was not folded"):
        load_released(CellClassifier("efficientnet_lite0"), tmp_path / "unfolded.onnx")


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
    started = state["started_from"]
    assert started["version"] == "0.0.0-test" and len(started["sha256"]) == 64


def test_a_fine_tune_resumes_with_its_norms_still_frozen(smoke_release: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path, epochs=2, limit_train=4, limit_validation=8, init_from=str(smoke_release))
    main(config, stop_after=1)
    main(config, resume=tmp_path / "last.pt")
    state = load_checkpoint(tmp_path / "last.pt")
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    variances = [t for name, t in state["model"].items() if name.endswith("running_var")]
    assert variances and all(torch.equal(t, torch.full_like(t, 1 - 1e-5)) for t in variances)


def test_a_resume_must_start_from_the_same_place(
    smoke_run: Path, smoke_release: Path, tmp_path: Path
) -> None:
    # resumed with init_from, a run from ImageNet would freeze norms it trained (and the reverse undo a fold)
    with pytest.raises(
        ConfigError, match=r"started from ImageNet; the config says init_from .*smoke-release"
    ):
        main(tiny_config(tmp_path / "run", init_from=str(smoke_release)), resume=smoke_run / "last.pt")


def test_a_release_of_another_architecture_is_refused(smoke_release: Path, tmp_path: Path) -> None:
    config = tiny_config(tmp_path / "run", architecture="efficientnet_lite2", init_from=str(smoke_release))
    with pytest.raises(
        ConfigError, match="holds a efficientnet_lite0 network; the config says efficientnet_lite2"
    ):
        main(config)


def test_a_folder_that_is_no_release_is_refused_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^init_from: .*expected a released model folder") as caught:
        main(tiny_config(tmp_path / "run", init_from=str(tmp_path)))
    assert "\n" not in str(caught.value)


def registry_of(release: Path, root: Path, version: str = "0.0.0-test") -> Path:
    """A model registry holding a copy of `release` as its active version."""
    import shutil

    from model.registry import Registry

    shutil.copytree(release, root / version)
    Registry(root).promote(version, note="test registry")
    return root


def test_a_registry_folder_starts_from_its_active_version(smoke_release: Path, tmp_path: Path) -> None:
    root = registry_of(smoke_release, tmp_path / "registry")
    main(tiny_config(tmp_path / "run", limit_train=4, limit_validation=8, init_from=str(root)))
    started = load_checkpoint(tmp_path / "run" / "last.pt")["started_from"]
    assert started["folder"] == str(root / "0.0.0-test") and started["registry"] == str(root)
    assert started["version"] == "0.0.0-test"


def test_a_registry_without_an_active_version_is_refused_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "registry"
    root.mkdir()
    (root / "registry.json").write_text('{"active": null, "shadow": null, "versions": {}, "history": []}')
    with pytest.raises(ConfigError, match=r"^init_from: the registry .* has no active version") as caught:
        main(tiny_config(tmp_path / "run", init_from=str(root)))
    assert "\n" not in str(caught.value)


def test_a_resume_after_the_active_version_changed_is_refused(smoke_release: Path, tmp_path: Path) -> None:
    root = registry_of(smoke_release, tmp_path / "registry")
    config = tiny_config(tmp_path / "run", epochs=2, limit_train=4, limit_validation=8, init_from=str(root))
    main(config, stop_after=1)
    # as if another version had been promoted since: the checkpoint names a graph init_from no longer gives
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    state["started_from"] = {**state["started_from"], "version": "0.0.0-before", "sha256": "0" * 64}
    torch.save(state, tmp_path / "run" / "last.pt")
    with pytest.raises(
        ConfigError, match=r"started from pvqc-cell 0.0.0-before .* now gives pvqc-cell 0.0.0-test"
    ):
        main(config, resume=tmp_path / "run" / "last.pt")


def test_a_run_from_the_registry_resumes_from_the_version_folder_it_started_from(
    smoke_release: Path, tmp_path: Path
) -> None:
    # what the refusal above advises after a promotion: init_from the folder the run started from
    root = registry_of(smoke_release, tmp_path / "registry")
    settings = {"epochs": 2, "limit_train": 4, "limit_validation": 8}
    main(tiny_config(tmp_path / "run", init_from=str(root), **settings), stop_after=1)
    version = str(root / "0.0.0-test")
    main(tiny_config(tmp_path / "run", init_from=version, **settings), resume=tmp_path / "run" / "last.pt")
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    assert state["started_from"]["folder"] == version
