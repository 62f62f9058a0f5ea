"""Several training runs side by side on one machine, under one deadline: `python -m training.sweep`.

Owns: starting one `training.train` process per run of a sweep file, each with its own output folder and
log, stopping those still running at the deadline (their best.pt so far stays), and collecting what
export needs into one folder: a slim checkpoint per run (training/slim.py) and a summary of each run's
validation figures. Made for a time-boxed GPU machine, where one small network leaves most of the
device idle, so a few recipes cost about the time of one; the release is then chosen on the validation
figures, never on the test split.

On such a machine runs stopped at the deadline are the plan, not a fault: a run that finished, or was
stopped with a best.pt so far, is a usable result. The exit status is 0 when every run is one, 1 when a
run crashed (its own nonzero exit) or left no checkpoint (one `error:` line on stderr per such run names
it), and 2 for a bad sweep file.

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
import enum
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


class Ending(enum.StrEnum):
    """How a run's process ended: on its own (with exit 0 or not), or stopped by the sweep."""

    FINISHED = "finished"
    FAILED = "failed"
    STOPPED = "stopped at the deadline"


@dataclass(frozen=True)
class Outcome:
    """One run's ending and, where it ended on its own, its exit status."""

    ending: Ending
    exit_code: int | None = None

    def __str__(self) -> str:
        # the summary's wording: 'finished', 'failed (exit N)' or 'stopped at the deadline'
        return f"failed (exit {self.exit_code})" if self.ending is Ending.FAILED else str(self.ending)


def ended(code: int) -> Outcome:
    """The outcome of a run whose process exited on its own with this status."""
    return Outcome(Ending.FINISHED, code) if code == 0 else Outcome(Ending.FAILED, code)


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


def wait_all(processes: dict[str, subprocess.Popen[bytes]], deadline: float) -> dict[str, Outcome]:
    """Each run's outcome: finished, failed (its own nonzero exit) or stopped at the deadline."""
    outcome: dict[str, Outcome] = {}
    while len(outcome) < len(processes):
        # read before polling: a run that ends on its own by the time it is polled is not 'stopped',
        # so a crash just before the deadline cannot pass as a planned stop
        past_deadline = time.monotonic() > deadline
        for name, process in processes.items():
            if name in outcome:
                continue
            if process.poll() is not None:
                outcome[name] = ended(process.returncode)
                log.info("%s %s", name, outcome[name])
            elif past_deadline:
                stop(process)
                outcome[name] = Outcome(Ending.STOPPED)
                log.warning("%s stopped at the deadline", name)
        if len(outcome) < len(processes):
            time.sleep(POLL_SECONDS)
    return outcome


def problem(name: str, outcome: Outcome | None, has_checkpoint: bool, train_log: Path) -> str | None:
    """What makes a run no usable result, in one line naming it; None when it is one (finished, or
    stopped at the deadline, with a best.pt to collect). A crash fails the sweep even with a best.pt: the
    run did not end as its recipe says."""
    if outcome is None:
        return f"run {name!r} was not started"
    if outcome.ending is Ending.FAILED:
        return f"run {name!r} failed (exit {outcome.exit_code}); its log is {train_log}"
    if not has_checkpoint and outcome.ending is Ending.STOPPED:
        return f"run {name!r} was stopped at the deadline before its first checkpoint: nothing to collect"
    if not has_checkpoint:
        return f"run {name!r} finished without a best.pt: nothing to collect; its log is {train_log}"
    return None


def best_row(metrics_csv: Path) -> dict[str, float]:
    """The epoch with the highest validation AUC (the one best.pt holds) and how many epochs ran."""
    with metrics_csv.open() as handle:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]
    best = max(rows, key=lambda r: r["val_auc"])
    return {**best, "epochs_run": float(len(rows))}


def collect(
    runs: list[Run], work: Path, dest: Path, outcome: dict[str, Outcome], half: bool
) -> list[dict[str, Any]]:
    """A slim copy of each run's best.pt (a crashed run's too) and summary.json: per run its outcome, its
    best epoch's figures, whether it is a usable result and, if not, the one-line problem."""
    from training.slim import slim_checkpoint

    dest.mkdir(parents=True, exist_ok=True)
    summary = []
    for run in runs:
        entry: dict[str, Any] = {"run": run.name, "config": str(run.config), "set": run.overrides}
        ending = outcome.get(run.name)
        entry["outcome"] = "not started" if ending is None else str(ending)
        best = work / run.name / "best.pt"
        if best.is_file():
            entry["best"] = best_row(work / run.name / "metrics.csv")
            entry["checkpoint"] = slim_checkpoint(best, dest / f"{run.name}.pt", half)["dest"]
        trouble = problem(run.name, ending, best.is_file(), work / run.name / "train.log")
        entry["usable"] = trouble is None
        if trouble is not None:
            entry["problem"] = trouble
        elif ending is not None and ending.ending is Ending.STOPPED:
            log.info(
                "%s stopped at the deadline: its best checkpoint so far is collected (epoch %d of %d run)",
                run.name,
                entry["best"]["epoch"],
                entry["best"]["epochs_run"],
            )
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
    # runs stopped at the deadline with a checkpoint are the plan on a time-boxed machine, not a failure
    troubles = [entry["problem"] for entry in summary if not entry["usable"]]
    for trouble in troubles:
        print(f"error: {trouble}", file=sys.stderr)
    return 1 if troubles else 0


if __name__ == "__main__":
    sys.exit(cli())
