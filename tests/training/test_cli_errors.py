"""Bad input to the training scripts ends with a one-line error saying what was expected, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.train import CHECKPOINT_FORMAT

pytestmark = pytest.mark.slow


def run(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=180, env={**os.environ, **env}
    )


def assert_one_line_error(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_unknown_config_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("epochz: 3\n")
    assert_one_line_error(
        run(["training.train", "--config", str(config)]), "unknown config key(s) ['epochz']"
    )


def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_line_error(
        run(["training.train", "--config", str(tmp_path / "nope.yaml")]), "expected a config file"
    )


def test_missing_data(tmp_path: Path) -> None:
    done = run(["training.train", "--set", f"out_dir={tmp_path}"], PVQC_ELPV_ROOT=str(tmp_path))
    assert_one_line_error(done, "expected ELPV labels")


def test_checkpoint_that_is_not_pvqcs(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    done = run(
        ["training.export", "--checkpoint", str(foreign), "--out", str(tmp_path / "o"), "--version", "1"]
    )
    assert_one_line_error(done, "is not a pvqc checkpoint")


def test_checkpoint_of_another_architecture(smoke_run: Path, tmp_path: Path) -> None:
    state = torch.load(smoke_run / "best.pt", weights_only=False)
    state["config"]["architecture"] = "efficientnet_lite2"  # lite0 weights claiming to be lite2
    other = tmp_path / "other.pt"
    torch.save(state, other)
    assert state["format"] == CHECKPOINT_FORMAT
    done = run(
        ["training.export", "--checkpoint", str(other), "--out", str(tmp_path / "o"), "--version", "1"]
    )
    assert_one_line_error(done, "do not fit efficientnet_lite2")


def test_resume_with_another_architecture(smoke_run: Path, tmp_path: Path) -> None:
    done = run(
        [
            "training.train",
            "--set",
            "architecture=efficientnet_lite2",
            f"out_dir={tmp_path}",
            "--resume",
            str(smoke_run / "last.pt"),
        ]
    )
    assert_one_line_error(done, "holds a efficientnet_lite0 network")


def test_camera_augmentation_on_cached_features_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"freeze_blocks": 3, "cache_frozen": true, "shift": 0.03}')
    assert_one_line_error(run(["training.train", "--config", str(config)]), "need cache_frozen: false")


def test_reviewed_weights_must_match_the_sets(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text('{"reviewed_sets": ["a", "b"], "reviewed_weights": [2.0]}')
    assert_one_line_error(
        run(["training.train", "--config", str(config)]),
        "reviewed_weights must give one weight per reviewed set",
    )


def test_repeated_set_flags_accumulate(tmp_path: Path) -> None:
    # Were only the last --set kept, this would start a full training run instead of refusing.
    done = run(
        ["training.train", "--set", "freeze_blocks=3", "--set", "cache_frozen=true", "--set", "shift=0.03"]
    )
    assert_one_line_error(done, "need cache_frozen: false")


def test_incomplete_checkpoint(tmp_path: Path) -> None:
    partial = tmp_path / "partial.pt"
    torch.save({"format": CHECKPOINT_FORMAT}, partial)
    done = run(
        ["training.export", "--checkpoint", str(partial), "--out", str(tmp_path / "o"), "--version", "1"]
    )
    assert_one_line_error(done, "is an incomplete pvqc checkpoint")


def test_config_value_of_the_wrong_type(tmp_path: Path) -> None:
    config = tmp_path / "typed.yaml"
    config.write_text("epochs: ten\n")
    done = run(["training.train", "--config", str(config)])
    assert_one_line_error(done, "epochs: input should be a valid integer, got 'ten'")


def test_evaluate_a_release_whose_onnx_is_not_a_model(tmp_path: Path) -> None:
    from model.card import SHIPPED_MODEL_DIR

    release = tmp_path / "release"
    release.mkdir()
    (release / "card.json").write_text((SHIPPED_MODEL_DIR / "card.json").read_text())
    (release / "model.onnx").write_bytes(b"not a protobuf")
    done = run(["training.evaluate", "--model", str(release), "--out", str(tmp_path / "r"), "--limit", "4"])
    assert_one_line_error(done, "onnxruntime cannot load")


def test_evaluate_a_release_whose_onnx_breaks_the_contract(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save_model

    from model.card import SHIPPED_MODEL_DIR

    release = tmp_path / "release"
    release.mkdir()
    (release / "card.json").write_text((SHIPPED_MODEL_DIR / "card.json").read_text())
    # a graph that loads, but whose input is `x` where every caller feeds `image`
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["probability"]), helper.make_node("Identity", ["x"], ["cam"])],
        "other-names",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 300, 300])],
        [
            helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["batch", 1, 300, 300]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["batch", 1, 300, 300]),
        ],
    )
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), release / "model.onnx")
    done = run(["training.evaluate", "--model", str(release), "--out", str(tmp_path / "r"), "--limit", "4"])
    assert_one_line_error(done, "expected the input 'image' and the outputs 'probability' and 'cam'")


def test_config_value_out_of_range(tmp_path: Path) -> None:
    done = run(["training.train", "--set", "limit_train=0", f"out_dir={tmp_path / 'run'}"])
    assert_one_line_error(done, "limit_train must be >= 1")
    assert not (tmp_path / "run").exists()


def assert_one_line_return(code: int, capsys: pytest.CaptureFixture[str], expected: str) -> None:
    assert code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err


@pytest.mark.parametrize("cells", ["0", "-3"])
def test_export_refuses_fewer_than_one_calibration_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], cells: str
) -> None:
    from training.export import cli

    argv = ["--checkpoint", "x.pt", "--out", str(tmp_path), "--version", "1", "--calibration-cells", cells]
    with pytest.raises(SystemExit) as caught:
        cli(argv)
    assert caught.value.code == 2
    assert f"--calibration-cells expects >= 1 training cells, got {cells}" in capsys.readouterr().err


def test_export_into_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.export import cli

    taken = tmp_path / "taken"
    taken.write_text("a file")
    code = cli(["--checkpoint", str(tmp_path / "x.pt"), "--out", str(taken), "--version", "1"])
    assert_one_line_return(code, capsys, "expected a folder for the release")


def test_evaluate_into_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from training.evaluate import cli

    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert_one_line_return(
        cli(["--out", str(taken), "--limit", "1"]), capsys, "expected a folder for the report"
    )
    assert_one_line_return(
        cli(["--out", str(taken / "inside"), "--limit", "1"]), capsys, "expected --out to be a folder"
    )
