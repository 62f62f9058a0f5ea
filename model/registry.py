"""The model registry: one folder per model name, one sub-folder per version, one `registry.json`.

Owns: the layout `<root>/<version>/` (card.json, ONNX files, parity.npz, evaluation reports) with
`<root>/registry.json` holding each version's status (candidate, active, retired), the shadow version
and the promotion history; the checks a candidate must pass before it serves (a complete card, its
files present with the hashes the card records, ONNX parity on the reference cells saved at export);
and promote, rollback and shadow. Unless forced, a promotion needs the recorded evaluation of the
candidate against the version it replaces. Writes are atomic (temp file + rename, under a file lock),
so replicas that poll `registry.json` never read half a file; promote and rollback run their slow
checks before taking the lock and refuse if the active version changed meanwhile. Training and
serving both read it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import fcntl
import getpass
import hashlib
import json
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.card import CARD_FILE, CardError, ModelCard, read_card
from model.onnx_export import ModelFileError, onnx_session

REGISTRY_FILE = "registry.json"
LOCK_FILE = ".registry.lock"
PARITY_FILE = "parity.npz"
PARITY_TOLERANCE = 1e-4
# fields a card must fill (beyond its schema) before its model may serve
PROMOTION_FIELDS = ("operating_points", "files", "provenance", "metrics", "licence")
PARITY_EXPECTED = "expected an .npz with 'cells' (N, S, S) and 'probabilities' (N,), written at export"
JSON_KINDS = {
    dict: "an object",
    list: "a list",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
}


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says what was expected."""


class Status(enum.StrEnum):
    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"


@dataclass(frozen=True)
class VersionInfo:
    version: str
    status: Status
    shadow: bool
    folder: Path
    card: ModelCard | None
    problem: str | None  # why the card cannot be read, if it cannot
    evaluation: dict[str, Any] | None


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def who() -> str:
    with contextlib.suppress(Exception):
        return getpass.getuser()
    return "unknown"


class Registry:
    """The versions of one model under `root` (e.g. models/pvqc-cell)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def path(self) -> Path:
        return self.root / REGISTRY_FILE

    # -- reading --------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """registry.json as a dict (an empty registry when the file does not exist yet)."""
        if not self.path.is_file():
            return {"active": None, "shadow": None, "versions": {}, "history": []}
        try:
            state = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(f"{self.path} is not valid JSON: {exc}") from exc
        return checked_state(self.path, state)

    def folder(self, version: str) -> Path:
        folder = self.root / version
        if not (folder / CARD_FILE).is_file():
            raise RegistryError(f"no model version {version!r}: expected {folder / CARD_FILE}")
        return folder

    def active(self) -> str | None:
        active: str | None = self.state()["active"]
        return active

    def shadow(self) -> str | None:
        shadow: str | None = self.state()["shadow"]
        return shadow

    def versions(self) -> list[VersionInfo]:
        """Every version folder (those not yet in registry.json are candidates), sorted by name."""
        state = self.state()
        children = self.root.iterdir() if self.root.is_dir() else iter(())
        folders = sorted(p for p in children if (p / CARD_FILE).is_file())
        infos = []
        for folder in folders:
            entry = state["versions"].get(folder.name, {})
            card, problem = None, None
            try:
                card = read_card(folder)
            except CardError as exc:
                problem = str(exc)
            infos.append(
                VersionInfo(
                    version=folder.name,
                    status=Status(entry.get("status", Status.CANDIDATE)),
                    shadow=state["shadow"] == folder.name,
                    folder=folder,
                    card=card,
                    problem=problem,
                    evaluation=entry.get("evaluation"),
                )
            )
        return infos

    # -- writing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """The state under an exclusive lock; written back atomically when the block ends cleanly."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK_FILE).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = self.state()
            yield state
            temporary = self.path.with_name(f".{REGISTRY_FILE}.{os.getpid()}.tmp")
            with temporary.open("w") as handle:
                handle.write(json.dumps(state, indent=2) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            temporary.replace(self.path)

    def record_evaluation(self, version: str, evaluation: dict[str, Any]) -> None:
        self.folder(version)
        with self._locked() as state:
            entry = state["versions"].setdefault(version, {"status": Status.CANDIDATE.value})
            entry["evaluation"] = evaluation

    def promote(self, version: str, *, force: bool = False, note: str = "") -> str | None:
        """Make `version` active after the checks; returns the version it replaced.

        Refuses (RegistryError) a card with missing fields, missing or altered files, or an ONNX file
        that fails parity; unless `force`, a candidate without a recorded evaluation against the active
        version (none is needed while no version is active) or whose evaluation refused it; and, forced
        or not, when another promotion or rollback changed the active version during these checks.
        """
        folder = self.folder(version)
        before = self.state()
        refuse_promotion(before, version, force)  # at once, not after the slow parity check
        check_candidate(folder)
        previous: str | None = before["active"]
        with self._locked() as state:
            # the checks ran unlocked: another shell may have promoted or rolled back meanwhile, and
            # the evaluation seen above may no longer be against the version this one would replace
            refuse_if_changed(previous, state["active"], f"promoting {version}")
            refuse_promotion(state, version, force)
            activate(state, version, previous, "promote", note, forced=force)
        return previous

    def rollback(self, *, note: str = "") -> str:
        """Re-activate the version the latest promotion replaced; returns it."""
        active, previous = rollback_target(self.state())
        check_candidate(self.folder(previous))
        with self._locked() as state:
            # the parity check ran unlocked: a promotion or rollback meanwhile makes `active` stale,
            # and retiring it would leave the version activated since also "active"
            refuse_if_changed(active, state["active"], f"rolling back to {previous}")
            if rollback_target(state) != (active, previous):
                raise RegistryError(
                    f"the history of {active} changed while rolling back to {previous}; nothing was changed: "
                    "check `pvqc models list` and run the rollback again"
                )
            activate(state, previous, active, "rollback", note)
        return previous

    def set_shadow(self, version: str | None) -> None:
        """Let `version` score live frames beside the active model (None: no shadow)."""
        if version is not None:
            check_candidate(self.folder(version))
        with self._locked() as state:
            if version is not None and version == state["active"]:
                raise RegistryError(f"{version} is the active version; a shadow must be another one")
            state["shadow"] = version
            state["history"].append({"action": "shadow", "version": version, "at": now_iso(), "by": who()})


# -- the rules of registry.json ---------------------------------------------------------------------


def json_kind(value: object) -> str:
    return JSON_KINDS.get(type(value), "null" if value is None else type(value).__name__)


def checked_state(path: Path, state: object) -> dict[str, Any]:
    """`state` as read from `path`, defaults filled; RegistryError unless it has registry.json's shape."""
    if not isinstance(state, dict):
        raise RegistryError(
            f"{path} holds {json_kind(state)}, expected a JSON object with 'active', 'shadow', 'versions' "
            "and 'history'"
        )
    state.setdefault("active", None)
    state.setdefault("shadow", None)
    state.setdefault("versions", {})
    state.setdefault("history", [])
    for key in ("active", "shadow"):
        if state[key] is not None and not isinstance(state[key], str):
            raise RegistryError(f"{path}: '{key}' holds {json_kind(state[key])}, expected a version or null")
    if not isinstance(state["versions"], dict):
        raise RegistryError(
            f"{path}: 'versions' holds {json_kind(state['versions'])}, expected an object of version entries"
        )
    statuses = [status.value for status in Status]
    for version, entry in state["versions"].items():
        if (
            not isinstance(entry, dict)
            or entry.get("status", Status.CANDIDATE) not in statuses
            or not isinstance(entry.get("evaluation", {}), dict)
        ):
            raise RegistryError(
                f"{path}: the entry of version {version!r} is {json.dumps(entry)}, expected an object with "
                f"a 'status' in {statuses} and optionally an 'evaluation' object"
            )
    history = state["history"]
    if not isinstance(history, list) or not all(isinstance(event, dict) for event in history):
        raise RegistryError(f"{path}: 'history' holds {json_kind(history)}, expected a list of event objects")
    return state


def refuse_promotion(state: dict[str, Any], version: str, force: bool) -> None:
    """RegistryError unless `state` lets `version` be promoted: not active yet and, unless `force`,
    evaluated against the active version with the rule's consent."""
    active = state["active"]
    if active == version:
        raise RegistryError(f"{version} is already active")
    if force or active is None:
        return  # the first version of an empty registry has nothing to be compared with
    evaluation = state["versions"].get(version, {}).get("evaluation")
    evaluate = (
        f"run `pvqc models evaluate {version}` against the active version {active} first, or pass --force"
    )
    if evaluation is None:
        raise RegistryError(f"{version} has no recorded evaluation: {evaluate}")
    if evaluation.get("against") != active:
        # compared with an earlier active version: says nothing about the one it would replace
        raise RegistryError(
            f"{version} was evaluated against {evaluation.get('against')}, not the active version {active}: "
            f"{evaluate}"
        )
    if not evaluation.get("promote", False):
        raise RegistryError(
            f"the evaluation of {version} against {active} refused it: "
            f"{evaluation.get('reason', 'no reason recorded')} (use --force to promote anyway)"
        )


def refuse_if_changed(checked: str | None, now: str | None, doing: str) -> None:
    """RegistryError when the active version is no longer the one the unlocked checks saw."""
    if now != checked:
        raise RegistryError(
            f"the active version changed from {checked or 'none'} to {now or 'none'} while {doing}; "
            "nothing was changed: check `pvqc models list` and run it again"
        )


def rollback_target(state: dict[str, Any]) -> tuple[str, str]:
    """The active version and the one its latest promotion replaced: what a rollback swaps."""
    active = state["active"]
    if active is None:
        raise RegistryError("no active version to roll back from")
    for event in reversed(state["history"]):
        if event.get("action") == "promote" and event.get("version") == active and event.get("previous"):
            return active, str(event["previous"])
    raise RegistryError(f"{active} replaced no earlier version: nothing to roll back to")


# -- the checks before a model may serve ------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_candidate(folder: Path, tolerance: float = PARITY_TOLERANCE) -> float:
    """Raise RegistryError saying what is wrong with `folder`'s model; return the parity figure."""
    try:
        card = read_card(folder)
    except CardError as exc:
        raise RegistryError(f"refused: {exc}") from exc
    raw = json.loads((folder / CARD_FILE).read_text())
    missing = [name for name in PROMOTION_FIELDS if not raw.get(name)]
    if missing:
        raise RegistryError(f"refused: the model card {folder / CARD_FILE} lacks the field(s) {missing}")
    if "fp32" not in card.files:
        raise RegistryError(f"refused: the model card names no 'fp32' file (files: {card.files})")
    recorded = card.provenance.get("sha256", {}) if isinstance(card.provenance.get("sha256"), dict) else {}
    for variant, name in card.files.items():
        path = folder / name
        if not path.is_file():
            raise RegistryError(f"refused: the card's {variant} file {path} does not exist")
        if name in recorded and file_sha256(path) != recorded[name]:
            raise RegistryError(f"refused: {path} does not match the sha256 its card records")
    return check_parity_reference(folder, card, tolerance)


def check_parity_reference(folder: Path, card: ModelCard, tolerance: float = PARITY_TOLERANCE) -> float:
    """Max |p - p_reference| of the FP32 ONNX file on the reference cells saved at export."""
    reference = folder / PARITY_FILE
    cells, expected = read_parity_reference(reference)
    onnx_path = card.onnx_path(folder, "fp32")
    try:
        session: Any = onnx_session(onnx_path)
    except ModelFileError as exc:
        raise RegistryError(f"refused: {exc}") from exc
    got = []
    try:
        for start in range(0, len(cells), 16):
            batch = cells[start : start + 16].astype(np.float32)[:, None]
            outputs = session.run([card.probability_output], {card.input.tensor.name: batch})
            got.append(np.asarray(outputs[0]).reshape(-1))
    except Exception as exc:  # onnxruntime raises its own types (InvalidArgument, Fail, ...) per cause
        size = card.input.size
        raise RegistryError(
            f"refused: {onnx_path} cannot score the parity cells {reference} holds, shape {cells.shape} "
            f"(expected (N, {size}, {size})): {' '.join(str(exc).split())}"
        ) from exc
    difference = float(np.abs(np.concatenate(got) - expected).max()) if len(cells) else 0.0
    if not difference <= tolerance:  # NaN fails too
        raise RegistryError(
            f"refused: ONNX parity failed: {card.onnx_path(folder, 'fp32')} differs from the export's "
            f"reference probabilities by {difference:.2e} (allowed {tolerance:.0e})"
        )
    return difference


def read_parity_reference(reference: Path) -> tuple[np.ndarray, np.ndarray]:
    """The cells (N, S, S) and their FP32 probabilities (N,) that export saved in `reference`."""
    if not reference.is_file():
        raise RegistryError(
            f"refused: no parity reference {reference} (cells + expected probabilities written at export)"
        )
    try:
        loaded = np.load(reference)  # allow_pickle stays False: a pickle is refused, never run
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise RegistryError(
                f"refused: the parity reference {reference} holds one array: {PARITY_EXPECTED}"
            )
        with loaded as data:
            missing = [key for key in ("cells", "probabilities") if key not in data.files]
            if missing:
                raise RegistryError(
                    f"refused: the parity reference {reference} lacks {missing} (it holds {data.files}): "
                    f"{PARITY_EXPECTED}"
                )
            cells, probabilities = np.asarray(data["cells"]), np.asarray(data["probabilities"]).reshape(-1)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise RegistryError(
            f"refused: cannot read the parity reference {reference} ({exc}): {PARITY_EXPECTED}"
        ) from exc
    if cells.ndim != 3:
        raise RegistryError(
            f"refused: the parity reference {reference} holds cells of shape {cells.shape}: {PARITY_EXPECTED}"
        )
    if len(cells) != len(probabilities):
        raise RegistryError(
            f"refused: the parity reference {reference} holds {len(cells)} cells but {len(probabilities)} "
            f"probabilities: {PARITY_EXPECTED}"
        )
    return cells, probabilities


def activate(
    state: dict[str, Any], version: str, previous: str | None, action: str, note: str, forced: bool = False
) -> None:
    """Make `version` the active one in a locked registry state, retire `previous`, log the action."""
    if previous is not None:
        state["versions"].setdefault(previous, {})["status"] = Status.RETIRED.value
    state["versions"].setdefault(version, {})["status"] = Status.ACTIVE.value
    state["active"] = version
    if state["shadow"] == version:
        state["shadow"] = None  # a version cannot shadow itself
    state["history"].append(
        {
            "action": action,
            "version": version,
            "previous": previous,
            "at": now_iso(),
            "by": who(),
            "note": note,
            "forced": forced,  # promoted past the evaluation rule: the audit must show it
        }
    )
