"""The model registry: promotion's checks (card fields, files, parity) and their messages, the
evaluation verdict, rollback, shadow, and atomic writes of registry.json."""

from __future__ import annotations

import json
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


def test_promote_and_rollback_keep_a_history(registry: Registry) -> None:
    assert registry.active() is None
    assert [v.status for v in registry.versions()] == [Status.CANDIDATE, Status.CANDIDATE]
    assert registry.promote("1.0.0") is None
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
    registry.promote("1.1.0")
    assert registry.shadow() is None  # promoted: it no longer shadows itself
