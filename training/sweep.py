"""Several training runs side by side on one machine, under one deadline: `python -m training.sweep`.

Owns: starting one `training.train` process per run of a sweep file, each with its own output folder and
log, stopping those still running at the deadline (their best.pt so far stays), and collecting what
export needs into one folder: a slim checkpoint per run (training/slim.py) and a summary of each run's
validation figures. Made for a time-boxed GPU machine, where one small network leaves most of the
device idle, so a few recipes cost about the time of one; the release is then chosen on the validation
figures, never on the test split.

A sweep file (YAML):

    deadline_s: 380
    runs:
      full-40: {config: configs/elpv-lite0-gpu.yaml}
      camera-lr15: {config: configs/elpv-lite0-gpu-camera.yaml, set: {lr: 0.0015}}

    python -m training.sweep configs/sweep-gpu.yaml --work runs/sweep --collect var/sweep --half
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.config import ConfigError, load_config

log = logging.getLogger("training.sweep")
POLL_SECONDS = 2.0


@dataclass
class Run:
    name: str
    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)


def read_sweep(path: Path) -> tuple[float, list[Run]]:
    """(deadline in seconds, runs) from a sweep file; every run's config is checked before any starts."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"expected a sweep file at {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        # the parser's message runs over several lines; the promise is one line
        raise ConfigError(f"{path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read the sweep file {path} ({exc.strerror or exc})") from exc
    if (
        not isinstance(values, dict)
        or set(values) - {"deadline_s", "runs"}
        or not isinstance(values.get("runs"), dict)
        or not values["runs"]
    ):
        raise ConfigError(f"expected {path} to hold 'runs' (name: {{config, set}}) and 'deadline_s' only")
    deadline_s = values.get("deadline_s", 3600)
    # bool is an int to Python, but `deadline_s: yes` is no number of seconds
    number = isinstance(deadline_s, int | float) and not isinstance(deadline_s, bool)
    if not number or not 0 < deadline_s < math.inf:
        raise ConfigError(f"deadline_s of {path}: expected a number of seconds > 0, got {deadline_s!r}")
    runs = [read_run(path, name, spec) for name, spec in values["runs"].items()]
    return float(deadline_s), runs


def read_run(path: Path, name: object, spec: object) -> Run:
    """One run of a sweep file, its config loaded with its overrides (a typo ends the sweep before any
    machine time is spent)."""
    expected = f"run {name!r} of {path}: expected {{config: FILE, set: {{KEY: VALUE}}}}"
    if not isinstance(spec, dict) or "config" not in spec or set(spec) - {"config", "set"}:
        raise ConfigError(expected)
    config, overrides = spec["config"], spec.get("set") or {}
    if not isinstance(config, str) or not config:
        raise ConfigError(f"{expected}; its config is {config!r}, not a file name")
    if not isinstance(overrides, dict) or not all(isinstance(key, str) for key in overrides):
        raise ConfigError(f"{expected}; its set is {overrides!r}, not a mapping of config keys")
    run = Run(str(name), Path(config), dict(overrides))
    load_config(run.config, run.overrides)
    return run


def start(run: Run, work: Path) -> subprocess.Popen[bytes]:
    out = work / run.name
    out.mkdir(parents=True, exist_ok=True)
    sets = [f"{k}={json.dumps(v)}" for k, v in {**run.overrides, "out_dir": str(out)}.items()]
    command = [sys.executable, "-m", "training.train", "--config", str(run.config), "--set", *sets]
    log.info("starting %s: %s", run.name, " ".join(command))
    with (out / "train.log").open("wb") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM, then SIGKILL after the grace period: checkpoints are written atomically, so either
    leaves the last best.pt whole."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_all(processes: dict[str, subprocess.Popen[bytes]], deadline: float) -> dict[str, str]:
    """Each run's outcome: 'finished', 'failed (exit N)' or 'stopped at the deadline'."""
    outcome: dict[str, str] = {}
    while len(outcome) < len(processes):
        for name, process in processes.items():
            if name not in outcome and process.poll() is not None:
                code = process.returncode
                outcome[name] = "finished" if code == 0 else f"failed (exit {code})"
                log.info("%s %s", name, outcome[name])
        if time.monotonic() > deadline:
            for name, process in processes.items():
                if name not in outcome:
                    stop(process)
                    outcome[name] = "stopped at the deadline"
                    log.warning("%s stopped at the deadline", name)
        time.sleep(POLL_SECONDS)
    return outcome


def best_row(metrics_csv: Path) -> dict[str, float]:
    """The epoch with the highest validation AUC (the one best.pt holds) and how many epochs ran."""
    with metrics_csv.open() as handle:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    best = max(rows, key=lambda r: r["val_auc"])
    return {**best, "epochs_run": float(len(rows))}


def collect(
    runs: list[Run], work: Path, dest: Path, outcome: dict[str, str], half: bool
) -> list[dict[str, Any]]:
    from training.slim import slim_checkpoint

    dest.mkdir(parents=True, exist_ok=True)
    summary = []
    for run in runs:
        entry: dict[str, Any] = {"run": run.name, "config": str(run.config), "set": run.overrides}
        entry["outcome"] = outcome.get(run.name, "not started")
        best = work / run.name / "best.pt"
        if best.is_file():
            entry["best"] = best_row(work / run.name / "metrics.csv")
            entry["checkpoint"] = slim_checkpoint(best, dest / f"{run.name}.pt", half)["dest"]
        summary.append(entry)
    (dest / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path, help="YAML file of runs (see the module docstring)")
    parser.add_argument("--work", type=Path, default=Path("runs/sweep"), help="each run's output folder")
    parser.add_argument("--collect", type=Path, default=Path("var/sweep"), help="slim checkpoints + summary")
    parser.add_argument("--half", action="store_true", help="collect float16 weights (half the size)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        deadline_s, runs = read_sweep(args.sweep)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    deadline = time.monotonic() + deadline_s
    processes = {run.name: start(run, args.work) for run in runs}
    outcome = wait_all(processes, deadline)
    summary = collect(runs, args.work, args.collect, outcome, args.half)
    print(json.dumps(summary))
    return 0 if all(o == "finished" for o in outcome.values()) else 1


if __name__ == "__main__":
    sys.exit(cli())
