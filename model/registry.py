"""The model registry: one folder per model name, one sub-folder per version, one `registry.json`.

Owns: the layout `<root>/<version>/` (card.json, ONNX files, parity.npz, evaluation reports) with
`<root>/registry.json` holding each version's status (candidate, active, retired), the shadow version
and the promotion history; the checks a candidate must pass before it serves (a complete card, its
files present with the hashes the card records, ONNX parity on the reference cells saved at export);
and promote, rollback and shadow. Writes are atomic (temp file + rename, under a file lock), so
replicas that poll `registry.json` never read half a file. Training and serving both read it.
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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.card import CARD_FILE, CardError, ModelCard, read_card

REGISTRY_FILE = "registry.json"
LOCK_FILE = ".registry.lock"
PARITY_FILE = "parity.npz"
PARITY_TOLERANCE = 1e-4
# fields a card must fill (beyond its schema) before its model may serve
PROMOTION_FIELDS = ("operating_points", "files", "provenance", "metrics", "licence")


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
            state: dict[str, Any] = json.loads(self.path.read_text())
        except json.JSONDecodeError as exc:
            raise RegistryError(f"{self.path} is not valid JSON: {exc}") from exc
        state.setdefault("active", None)
        state.setdefault("shadow", None)
        state.setdefault("versions", {})
        state.setdefault("history", [])
        return state

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
        that fails parity; and, unless `force`, a candidate whose recorded evaluation refused it.
        """
        folder = self.folder(version)
        check_candidate(folder)
        with self._locked() as state:
            entry = state["versions"].get(version, {})
            evaluation = entry.get("evaluation")
            if evaluation is not None and not evaluation.get("promote", False) and not force:
                raise RegistryError(
                    f"the evaluation of {version} against {evaluation.get('against')} refused it: "
                    f"{evaluation.get('reason', 'no reason recorded')} (use --force to promote anyway)"
                )
            previous: str | None = state["active"]
            if previous == version:
                raise RegistryError(f"{version} is already active")
            activate(state, version, previous, "promote", note)
        return previous

    def rollback(self, *, note: str = "") -> str:
        """Re-activate the version the latest promotion replaced; returns it."""
        state = self.state()
        active = state["active"]
        if active is None:
            raise RegistryError("no active version to roll back from")
        previous = None
        for event in reversed(state["history"]):
            if event.get("action") == "promote" and event.get("version") == active and event.get("previous"):
                previous = event["previous"]
                break
        if previous is None:
            raise RegistryError(f"{active} replaced no earlier version: nothing to roll back to")
        check_candidate(self.folder(previous))
        with self._locked() as state:
            activate(state, previous, active, "rollback", note)
        return str(previous)

    def set_shadow(self, version: str | None) -> None:
        """Let `version` score live frames beside the active model (None: no shadow)."""
        if version is not None:
            check_candidate(self.folder(version))
        with self._locked() as state:
            if version is not None and version == state["active"]:
                raise RegistryError(f"{version} is the active version; a shadow must be another one")
            state["shadow"] = version
            state["history"].append({"action": "shadow", "version": version, "at": now_iso(), "by": who()})


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
    import onnxruntime as ort

    reference = folder / PARITY_FILE
    if not reference.is_file():
        raise RegistryError(
            f"refused: no parity reference {reference} (cells + expected probabilities written at export)"
        )
    with np.load(reference) as data:
        cells, expected = data["cells"], data["probabilities"]
    session = ort.InferenceSession(str(card.onnx_path(folder, "fp32")), providers=["CPUExecutionProvider"])
    got = []
    for start in range(0, len(cells), 16):
        batch = cells[start : start + 16].astype(np.float32)[:, None]
        outputs = session.run([card.probability_output], {card.input.tensor.name: batch})
        got.append(np.asarray(outputs[0]).reshape(-1))
    difference = float(np.abs(np.concatenate(got) - expected.reshape(-1)).max()) if len(cells) else 0.0
    if not difference <= tolerance:  # NaN fails too
        raise RegistryError(
            f"refused: ONNX parity failed: {card.onnx_path(folder, 'fp32')} differs from the export's "
            f"reference probabilities by {difference:.2e} (allowed {tolerance:.0e})"
        )
    return difference


def activate(state: dict[str, Any], version: str, previous: str | None, action: str, note: str) -> None:
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
        }
    )
