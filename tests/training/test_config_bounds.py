"""Training configs: values out of range are refused with what was expected, before any data loads;
`--set` reads numbers and booleans as people type them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.config import ConfigError, config_from_mapping, load_config
from training.train import cli, parse_overrides


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"drop_rate": 2.0}, "drop_rate must be in [0, 1)"),
        ({"drop_rate": -0.1}, "drop_rate must be in [0, 1)"),
        ({"seed": -1}, "seed must be in 0..2147483647"),
        ({"seed": 2**40}, "seed must be in 0..2147483647"),
        ({"threads": -1}, "threads must be >= 0"),
        ({"weight_decay": -1}, "weight_decay must be a number >= 0"),
        ({"weight_decay": float("nan")}, "weight_decay must be a number >= 0"),
        ({"lr": 0}, "lr must be a number > 0"),
        ({"lr": float("inf")}, "lr must be a number > 0"),
        ({"epochs": 0}, "epochs must be >= 1"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"limit_train": 0}, "limit_train must be >= 1"),
        ({"limit_train": -1}, "limit_train must be >= 1"),  # was a slice [:-1]: all cells but one
        ({"limit_validation": 0}, "limit_validation must be >= 1"),
        ({"noise_sigma": float("inf")}, "noise_sigma must be a number >= 0"),
        ({"reviewed_sets": ["a"], "reviewed_weights": [float("inf")]}, "reviewed_weights must be > 0"),
        ({"architecture": "resnet9000"}, "unknown architecture 'resnet9000'; expected one of"),
        ({"out_dir": " "}, "out_dir must name a folder"),
    ],
)
def test_out_of_range_values_are_refused(values: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping(values)
    assert expected in str(caught.value)


def test_the_bounds_themselves_are_allowed() -> None:
    config = config_from_mapping(
        {"drop_rate": 0, "seed": 0, "threads": 0, "weight_decay": 0, "limit_train": 1, "limit_validation": 1}
    )
    assert config.limit_train == 1 and config.seed == 0


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("lr=.001", 0.001),
        ("lr=1.", 1.0),
        ("lr=3e-3", 0.003),
        ("lr=+2", 2),
        ("pretrained=True", True),
        ("pretrained=FALSE", False),
        ("pretrained=true", True),
        ("out_dir=runs/x", "runs/x"),
        ('reviewed_sets=["a", "b"]', ["a", "b"]),
        ("architecture=efficientnet_lite2", "efficientnet_lite2"),
    ],
)
def test_set_reads_values_as_people_type_them(raw: str, value: object) -> None:
    key = raw.split("=", 1)[0]
    assert parse_overrides([raw]) == {key: value}
    load_config(None, parse_overrides([raw]))  # and the config takes them


def test_set_still_refuses_what_is_no_value_of_the_field() -> None:
    with pytest.raises(ConfigError, match="pretrained: input should be a valid boolean, got 'no'"):
        load_config(None, parse_overrides(["pretrained=no"]))
    with pytest.raises(ConfigError, match=r"lr: input should be a valid number, got '1\.2\.3'"):
        load_config(None, parse_overrides(["lr=1.2.3"]))


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_unknown_architecture_is_refused_before_anything_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert cli(["--set", "architecture=resnet9000", f"out_dir={out}"]) == 2
    assert "unknown architecture 'resnet9000'" in one_line_error(capsys)
    assert not out.exists()


def test_cuda_without_a_gpu_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "run"
    assert cli(["--set", "device=cuda", f"out_dir={out}"]) == 2
    assert "device is cuda but no CUDA GPU is available here" in one_line_error(capsys)
    assert not out.exists()


def test_out_dir_that_is_a_file_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file")
    assert cli(["--set", f"out_dir={taken}", "pretrained=false"]) == 2
    assert "is a file; expected a folder for the run" in one_line_error(capsys)
    assert cli(["--set", f"out_dir={taken / 'inside'}", "pretrained=false"]) == 2
    assert "expected a folder for the run" in one_line_error(capsys)


def test_stop_after_below_one_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        cli(["--stop-after", "0"])
    assert caught.value.code == 2
    assert "--stop-after expects a number of epochs >= 1, got 0" in capsys.readouterr().err


def test_set_null_clears_what_the_file_sets(tmp_path: Path) -> None:
    # the fine-tune config starts from a release; `--set init_from=null` must take it back to ImageNet
    path = tmp_path / "run.yaml"
    path.write_text("init_from: models/pvqc-cell/1.2.2\nlimit_train: 8\n")
    config = load_config(path, parse_overrides(["init_from=null", "limit_train=null"]))
    assert config.init_from is None and config.limit_train is None
