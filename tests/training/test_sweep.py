"""The sweep: configs checked before anything starts, runs side by side, the deadline honoured, and
slim checkpoints plus a summary collected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import ConfigError, load_config
from training.sweep import cli, read_sweep

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CPU_TINY = "{device: cpu, limit_train: 8, limit_validation: 8, batch_size: 8, validation_views: 1}"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_a_typo_in_any_run_ends_the_sweep_before_it_starts(tmp_path: Path) -> None:
    sweep = write(
        tmp_path / "s.yaml",
        "runs:\n  a: {config: configs/elpv-lite0-gpu.yaml}\n"
        "  b: {config: configs/elpv-lite0-gpu.yaml, set: {learning_rate: 0.1}}\n",
    )
    with pytest.raises(ConfigError, match="unknown config key"):
        read_sweep(sweep)


@pytest.mark.parametrize(
    "text, message",
    [
        ("runs: {}\n", "expected"),
        ("deadline: 3\nruns:\n  a: {config: configs/elpv-lite0-gpu.yaml}\n", "expected"),
        ("runs:\n  a: {cfg: configs/elpv-lite0-gpu.yaml}\n", "expected {config"),
        ("runs:\n  a: {config: configs/missing.yaml}\n", "expected a config file"),
        ("runs: [\n", "not valid YAML"),
        ("runs:\n  a: {config: configs/elpv-lite0-cpu.yaml}\n deadline_s: 3\n", "not valid YAML"),
        ("5\n", "expected"),
        ("runs: [a, b]\n", "expected"),
        ("deadline_s: abc\nruns:\n  a: {config: configs/elpv-lite0-cpu.yaml}\n", "deadline_s of .*got 'abc'"),
        ("deadline_s: -5\nruns:\n  a: {config: configs/elpv-lite0-cpu.yaml}\n", "number of seconds > 0"),
        ("deadline_s: yes\nruns:\n  a: {config: configs/elpv-lite0-cpu.yaml}\n", "number of seconds > 0"),
        ("runs:\n  a: {config: configs/elpv-lite0-cpu.yaml, set: [1, 2]}\n", "not a mapping of config keys"),
        ("runs:\n  a: {config: 5}\n", "its config is 5, not a file name"),
        ("runs:\n  a: {config: configs/elpv-lite0-cpu.yaml, set: {lr: fast}}\n", "lr: input should be"),
    ],
)
def test_malformed_sweep_files_say_what_was_expected(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        read_sweep(write(tmp_path / "s.yaml", text))
    assert "\n" not in str(caught.value)  # the promise: one line


def test_cli_reports_a_bad_sweep_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli([str(tmp_path / "none.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: expected a sweep file at {tmp_path / 'none.yaml'}"


@pytest.mark.slow
def test_runs_side_by_side_and_the_deadline_stops_the_long_one(tmp_path: Path) -> None:
    sweep = write(
        tmp_path / "s.yaml",
        "deadline_s: 45\nruns:\n"
        f"  short: {{config: configs/elpv-lite0-gpu.yaml, set: {CPU_TINY[:-1]}, epochs: 1}}}}\n"
        f"  long: {{config: configs/elpv-lite0-gpu.yaml, set: {CPU_TINY[:-1]}, epochs: 500}}}}\n",
    )
    collected = tmp_path / "collected"
    rc = cli([str(sweep), "--work", str(tmp_path / "work"), "--collect", str(collected), "--half"])
    assert rc == 1  # not every run finished
    summary = {entry["run"]: entry for entry in json.loads((collected / "summary.json").read_text())}
    assert summary["short"]["outcome"] == "finished"
    assert summary["short"]["best"]["epochs_run"] == 1
    assert summary["long"]["outcome"] == "stopped at the deadline"
    assert (collected / "short.pt").is_file()
    # the long run kept what it had: its best checkpoint so far, if an epoch ended before the deadline
    assert (collected / "long.pt").is_file() == (tmp_path / "work" / "long" / "best.pt").is_file()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_committed_config_and_sweep_file_loads(path: Path) -> None:
    """A typo in a sweep file would otherwise surface on a lent GPU, whose minutes are few."""
    if path.name.startswith("sweep-"):
        _, runs = read_sweep(path)
        assert runs
    else:
        load_config(path)  # validated as it loads
