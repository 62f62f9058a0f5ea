"""The model registry: promotion's checks (card fields, files, parity) and their messages, the
evaluation verdict, rollback, shadow, and atomic writes of registry.json."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from model.registry import PARITY_FILE, Registry, RegistryError, Status
from tests.registry_helpers import tiny_version


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "pvqc-cell")
    tiny_version(registry.root / "1.0.0", "1.0.0")
    tiny_version(registry.root / "1.1.0", "1.1.0")
    return registry


def passing_evaluation(registry: Registry, version: str) -> None:
    """What `pvqc models evaluate` records for a candidate the rule let through, against the active."""
    registry.record_evaluation(
        version, {"against": registry.active(), "promote": True, "reason": "meets the rule"}
    )


def test_promote_and_rollback_keep_a_history(registry: Registry) -> None:
    assert registry.active() is None
    assert [v.status for v in registry.versions()] == [Status.CANDIDATE, Status.CANDIDATE]
    assert registry.promote("1.0.0") is None
    passing_evaluation(registry, "1.1.0")
    assert registry.promote("1.1.0") == "1.0.0"
    statuses = {v.version: v.status for v in registry.versions()}
    assert statuses == {"1.0.0": Status.RETIRED, "1.1.0": Status.ACTIVE}
    assert registry.rollback() == "1.0.0"
    assert registry.active() == "1.0.0"
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()
    actions = [event["action"] for event in json.loads(registry.path.read_text())["history"]]
    assert actions == ["promote", "promote", "rollback"]
    assert not list(registry.root.glob(".registry.json.*"))  # no temp file left behind


def test_a_card_missing_fields_is_refused_naming_them(registry: Registry) -> None:
    card = registry.root / "1.1.0" / "card.json"
    values = json.loads(card.read_text())
    values["provenance"] = {}
    del values["operating_points"]
    card.write_text(json.dumps(values))
    with pytest.raises(RegistryError, match="operating_points: Field required"):
        registry.promote("1.1.0")
    values["operating_points"] = {
        "threshold": 0.7,
        "review_threshold": 0.4,
        "threshold_rule": "t",
        "review_rule": "r",
    }
    card.write_text(json.dumps(values))
    with pytest.raises(RegistryError, match=r"lacks the field\(s\) \['provenance'\]"):
        registry.promote("1.1.0")
    assert registry.active() is None


def test_an_onnx_that_fails_parity_is_refused(registry: Registry) -> None:
    folder = registry.root / "1.1.0"
    with np.load(folder / PARITY_FILE) as data:
        cells, expected = data["cells"], data["probabilities"]
    np.savez(folder / PARITY_FILE, cells=cells, probabilities=expected + 1e-3)
    with pytest.raises(RegistryError, match=r"ONNX parity failed: .* by 1\.00e-03 \(allowed 1e-04\)"):
        registry.promote("1.1.0")
    (folder / PARITY_FILE).unlink()
    with pytest.raises(RegistryError, match="no parity reference"):
        registry.promote("1.1.0")


def test_missing_files_and_unknown_versions_are_refused(registry: Registry) -> None:
    (registry.root / "1.1.0" / "model.onnx").unlink()
    with pytest.raises(RegistryError, match=r"fp32 file .* does not exist"):
        registry.promote("1.1.0")
    with pytest.raises(RegistryError, match=r"no model version .9\.9\.9."):
        registry.promote("9.9.9")


def test_a_refusing_evaluation_blocks_promotion_unless_forced(registry: Registry) -> None:
    registry.promote("1.0.0")
    registry.record_evaluation("1.1.0", {"against": "1.0.0", "promote": False, "reason": "more escapes"})
    with pytest.raises(RegistryError, match="refused it: more escapes"):
        registry.promote("1.1.0")
    assert registry.promote("1.1.0", force=True) == "1.0.0"


def test_shadow_is_another_version_than_the_active_one(registry: Registry) -> None:
    registry.promote("1.0.0")
    with pytest.raises(RegistryError, match="is the active version"):
        registry.set_shadow("1.0.0")
    registry.set_shadow("1.1.0")
    assert registry.shadow() == "1.1.0"
    registry.promote("1.1.0", force=True)  # what is tested is the shadow, not the evaluation
    assert registry.shadow() is None  # promoted: it no longer shadows itself


def test_promotion_needs_an_evaluation_against_the_active_version(registry: Registry) -> None:
    registry.promote("1.0.0")  # the first version of an empty registry has nothing to be compared with
    with pytest.raises(
        RegistryError, match=r"run `pvqc models evaluate 1\.1\.0` against the active version 1\.0\.0"
    ):
        registry.promote("1.1.0")  # never evaluated
    # evaluated while another version was active: never compared with the one it would replace
    registry.record_evaluation("1.1.0", {"against": "0.9.0", "promote": True, "reason": "meets the rule"})
    with pytest.raises(RegistryError, match=r"evaluated against 0\.9\.0, not the active version 1\.0\.0"):
        registry.promote("1.1.0")
    assert registry.active() == "1.0.0"
    passing_evaluation(registry, "1.1.0")
    assert registry.promote("1.1.0") == "1.0.0"
    assert registry.state()["history"][-1]["forced"] is False
    assert registry.promote("1.0.0", force=True) == "1.1.0"  # never evaluated against 1.1.0: forced
    assert registry.state()["history"][-1]["forced"] is True  # ... and the audit shows it


def test_rollback_refuses_when_a_promotion_lands_during_its_checks(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import model.registry as registry_module

    tiny_version(registry.root / "1.2.0", "1.2.0")
    registry.promote("1.0.0")
    passing_evaluation(registry, "1.1.0")
    registry.promote("1.1.0")
    passing_evaluation(registry, "1.2.0")
    real_check = registry_module.check_candidate

    def check_while_another_shell_promotes(folder: Path, tolerance: float = 1e-4) -> float:
        # rollback checks 1.0.0 (its target) before it takes the lock; meanwhile 1.2.0 is promoted
        monkeypatch.setattr(registry_module, "check_candidate", real_check)
        Registry(registry.root).promote("1.2.0")
        return real_check(folder, tolerance)

    monkeypatch.setattr(registry_module, "check_candidate", check_while_another_shell_promotes)
    with pytest.raises(RegistryError, match=r"active version changed from 1\.1\.0 to 1\.2\.0"):
        registry.rollback()
    state = json.loads(registry.path.read_text())
    assert state["active"] == "1.2.0"
    assert [v for v, entry in state["versions"].items() if entry["status"] == "active"] == ["1.2.0"]
    assert [(e["action"], e["version"], e["previous"]) for e in state["history"]][-1] == (
        "promote",
        "1.2.0",
        "1.1.0",
    )
    assert registry.rollback() == "1.1.0"  # run again, it rolls back what is active now


@pytest.mark.parametrize("force", [False, True])
def test_promote_refuses_when_the_active_version_changes_during_its_checks(
    registry: Registry, monkeypatch: pytest.MonkeyPatch, force: bool
) -> None:
    import model.registry as registry_module

    tiny_version(registry.root / "1.2.0", "1.2.0")
    registry.promote("1.0.0")
    passing_evaluation(registry, "1.2.0")  # 1.2.0 was compared with 1.0.0 ...
    real_check = registry_module.check_candidate

    def check_while_another_shell_promotes(folder: Path, tolerance: float = 1e-4) -> float:
        monkeypatch.setattr(registry_module, "check_candidate", real_check)
        Registry(registry.root).promote("1.1.0", force=True)  # ... which 1.1.0 replaces meanwhile
        return real_check(folder, tolerance)

    monkeypatch.setattr(registry_module, "check_candidate", check_while_another_shell_promotes)
    with pytest.raises(RegistryError, match=r"active version changed from 1\.0\.0 to 1\.1\.0"):
        registry.promote("1.2.0", force=force)
    state = json.loads(registry.path.read_text())
    assert state["active"] == "1.1.0"
    assert [v for v, entry in state["versions"].items() if entry["status"] == "active"] == ["1.1.0"]


@pytest.mark.parametrize(
    "text", ["[]", '"pvqc"', '{"versions": []}', '{"history": {}}', '{"versions": {"1.0.0": "active"}}']
)
def test_a_registry_json_of_the_wrong_shape_is_refused_naming_the_file(registry: Registry, text: str) -> None:
    registry.path.write_text(text)
    with pytest.raises(RegistryError, match=f"{re.escape(str(registry.path))}.*expected"):
        registry.versions()
    registry.path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(RegistryError, match=f"{re.escape(str(registry.path))} is not valid JSON"):
        registry.active()


def test_an_onnx_file_onnxruntime_cannot_load_is_refused(registry: Registry) -> None:
    (registry.root / "1.1.0" / "model.onnx").write_bytes(b"not an onnx file (truncated copy)")
    with pytest.raises(RegistryError, match=r"refused: onnxruntime cannot load .*model\.onnx"):
        registry.promote("1.1.0")
    with pytest.raises(RegistryError, match="onnxruntime cannot load"):
        registry.set_shadow("1.1.0")


def test_a_parity_reference_that_is_not_the_exports_is_refused(registry: Registry) -> None:
    reference = registry.root / "1.1.0" / PARITY_FILE
    with np.load(reference) as data:
        cells = data["cells"]
    np.savez(reference, cells=cells)
    with pytest.raises(RegistryError, match=r"parity reference .* lacks \['probabilities'\]"):
        registry.promote("1.1.0")
    np.savez(reference, cells=cells[:, :16, :16], probabilities=np.zeros(len(cells)))
    with pytest.raises(RegistryError, match=r"cannot score the parity cells .* \(8, 16, 16\)"):
        registry.promote("1.1.0")
    np.savez(reference, cells=cells, probabilities=np.zeros(3))
    with pytest.raises(RegistryError, match="8 cells but 3 probabilities"):
        registry.promote("1.1.0")
    reference.write_bytes(b"not an npz file")
    with pytest.raises(RegistryError, match=r"cannot read the parity reference .*expected an \.npz"):
        registry.promote("1.1.0")
    assert registry.active() is None
