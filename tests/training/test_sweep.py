"""The sweep: configs checked before anything starts, runs side by side, the deadline honoured, and
slim checkpoints plus a summary collected."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

import training.slim
import training.sweep
from training.config import ConfigError, load_config
from training.sweep import Run, cli, read_sweep

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CPU_TINY = "{device: cpu, limit_train: 8, limit_validation: 8, batch_size: 8, validation_views: 1}"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# a fake run: whether it has written best.pt, and how its process ends (None: it runs until stopped)
FAKE_RUNS: dict[str, tuple[bool, int | None]] = {
    "finished": (True, 0),
    "stopped": (True, None),
    "stopped-bare": (False, None),
    "crashed": (False, 3),
    "crashed-late": (True, 3),
}


def fake_start(run: Run, work: Path) -> subprocess.Popen[bytes]:
    """Stands in for `training.train`: the checkpoint (if any) is on disk before the process starts, and
    the process is a shell that exits at once or sleeps until the sweep stops it."""
    has_checkpoint, code = FAKE_RUNS[run.name]
    out = work / run.name
    out.mkdir(parents=True)
    (out / "train.log").write_text("")
    if has_checkpoint:
        (out / "metrics.csv").write_text("epoch,val_auc\n1,0.81\n2,0.86\n")
        (out / "best.pt").write_bytes(b"weights")
    # exec: SIGTERM reaches the sleep itself, so no orphan outlives the test
    script = "exec sleep 60" if code is None else f"exit {code}"
    return subprocess.Popen(["sh", "-c", script])


def fake_slim(source: Path, dest: Path, half: bool) -> dict[str, Any]:
    dest.write_bytes(source.read_bytes())
    return {"dest": str(dest)}


def fake_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, names: list[str], deadline_s: float
) -> tuple[int, dict[str, dict[str, Any]]]:
    """cli's exit status and summary (by run) for a sweep of fake runs."""
    monkeypatch.setattr(training.sweep, "start", fake_start)
    monkeypatch.setattr(training.sweep, "POLL_SECONDS", 0.02)
    monkeypatch.setattr(training.slim, "slim_checkpoint", fake_slim)
    runs = "".join(f"  {name}: {{config: configs/elpv-lite0-cpu.yaml}}\n" for name in names)
    sweep = write(tmp_path / "s.yaml", f"deadline_s: {deadline_s}\nruns:\n{runs}")
    collected = tmp_path / "collected"
    rc = cli([str(sweep), "--work", str(tmp_path / "work"), "--collect", str(collected)])
    summary = json.loads((collected / "summary.json").read_text())
    return rc, {entry["run"]: entry for entry in summary}


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


def test_a_run_stopped_at_the_deadline_with_a_checkpoint_is_a_usable_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a lent GPU stopping runs at the deadline is the plan: the sweep must not report failure."""
    rc, summary = fake_sweep(tmp_path, monkeypatch, ["finished", "stopped"], deadline_s=1)
    assert rc == 0
    assert capsys.readouterr().err == ""
    assert summary["finished"]["outcome"] == "finished"
    assert summary["stopped"]["outcome"] == "stopped at the deadline"
    assert summary["stopped"]["usable"] and summary["finished"]["usable"]
    assert summary["stopped"]["best"]["epoch"] == 2  # its best epoch so far
    assert (tmp_path / "collected" / "stopped.pt").read_bytes() == b"weights"


@pytest.mark.parametrize(
    "name, deadline_s, message",
    [
        ("crashed", 30, "error: run 'crashed' failed (exit 3); its log is "),
        ("crashed-late", 30, "error: run 'crashed-late' failed (exit 3); its log is "),
        ("stopped-bare", 0.5, "error: run 'stopped-bare' was stopped at the deadline before"),
    ],
    ids=["crashed", "crashed-with-checkpoint", "stopped-without-checkpoint"],
)
def test_a_crashed_run_or_one_stopped_without_a_checkpoint_fails_the_sweep(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    deadline_s: float,
    message: str,
) -> None:
    rc, summary = fake_sweep(tmp_path, monkeypatch, ["finished", name], deadline_s)
    assert rc == 1
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith(message)  # one line, naming the run
    assert not summary[name]["usable"] and summary["finished"]["usable"]
    assert summary[name]["problem"] == errors[0].removeprefix("error: ")


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
    long_kept = (tmp_path / "work" / "long" / "best.pt").is_file()
    # stopped at the deadline is a usable result when an epoch ended before it, a failure when none did
    assert rc == (0 if long_kept else 1)
    summary = {entry["run"]: entry for entry in json.loads((collected / "summary.json").read_text())}
    assert summary["short"]["outcome"] == "finished"
    assert summary["short"]["best"]["epochs_run"] == 1
    assert summary["long"]["outcome"] == "stopped at the deadline"
    assert (collected / "short.pt").is_file()
    # the long run kept what it had: its best checkpoint so far, if an epoch ended before the deadline
    assert (collected / "long.pt").is_file() == long_kept
    assert summary["long"]["usable"] == long_kept


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_committed_config_and_sweep_file_loads(path: Path) -> None:
    """A typo in a sweep file would otherwise surface on a lent GPU, whose minutes are few."""
    if path.name.startswith("sweep-"):
        _, runs = read_sweep(path)
        assert runs
    else:
        load_config(path)  # validated as it loads
