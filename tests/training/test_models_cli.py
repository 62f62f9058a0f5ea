"""`pvqc models` on a damaged registry ends with exit code 2 and one line saying what was expected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasets.elpv import ElpvCells
from model.registry import PARITY_FILE, Registry
from tests.registry_helpers import tiny_version
from training import models
from training.models import cli


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    registry = Registry(tmp_path / "pvqc-cell")
    tiny_version(registry.root / "1.0.0", "1.0.0")
    tiny_version(registry.root / "2.0.0", "2.0.0")
    return registry


def run_cli(registry: Registry, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """Exit code and the lines `pvqc models --root <registry> ARGS` writes to stderr."""
    code = cli(["--root", str(registry.root), *args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, stderr: str, expected: str) -> None:
    assert code == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], stderr
    assert "Traceback" not in stderr


def four_cells() -> ElpvCells:
    """Two functional and two defective 32 px cells: a held-out set small enough for any test."""
    return ElpvCells(
        images=np.full((4, 32, 32), 200, np.uint8),
        probabilities=np.array([0.0, 0.0, 1.0, 1.0]),
        types=np.array(["mono"] * 4),
        names=np.array([f"cell{i}.png" for i in range(4)]),
    )


def break_onnx(registry: Registry, version: str) -> None:
    (registry.root / version / "model.onnx").write_bytes(b"not an onnx file (truncated copy)")


@pytest.mark.parametrize("command", [["promote", "2.0.0"], ["shadow", "2.0.0"]])
def test_an_onnx_file_onnxruntime_cannot_load(
    registry: Registry, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    break_onnx(registry, "2.0.0")
    code, stderr = run_cli(registry, capsys, *command)
    assert_one_line_error(code, stderr, "onnxruntime cannot load")


def test_evaluate_with_an_onnx_file_onnxruntime_cannot_load(
    registry: Registry, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "held_out_sets", lambda reviewed, limit: {"elpv_test": four_cells()})
    break_onnx(registry, "2.0.0")
    code, stderr = run_cli(registry, capsys, "evaluate", "2.0.0")
    assert_one_line_error(code, stderr, "onnxruntime cannot load")


def test_a_parity_reference_without_its_arrays(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    np.savez(registry.root / "2.0.0" / PARITY_FILE, cells=np.zeros((2, 32, 32), np.uint8))
    code, stderr = run_cli(registry, capsys, "promote", "2.0.0")
    assert_one_line_error(code, stderr, "lacks ['probabilities']")


@pytest.mark.parametrize("command", [["list"], ["promote", "2.0.0"], ["rollback"]])
def test_a_registry_json_that_is_not_an_object(
    registry: Registry, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    registry.path.write_text(json.dumps(["1.0.0"]))
    code, stderr = run_cli(registry, capsys, *command)
    assert_one_line_error(code, stderr, f"{registry.path} holds a list, expected a JSON object")


def test_promote_without_an_evaluation_says_what_to_run(
    registry: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(registry, capsys, "promote", "1.0.0")[0] == 0  # first version: nothing to compare with
    code, stderr = run_cli(registry, capsys, "promote", "2.0.0")
    assert_one_line_error(
        code,
        stderr,
        "run `pvqc models evaluate 2.0.0` against the active version 1.0.0 first, or pass --force",
    )
    code, stderr = run_cli(registry, capsys, "promote", "2.0.0", "--force")
    assert code == 0, stderr
    assert registry.active() == "2.0.0"


def test_evaluate_without_the_training_extras_says_what_to_install(
    registry: Registry, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the serving image has no scikit-learn: evaluate must say so in one line, not end in a traceback
    import sys

    for module in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.delitem(sys.modules, "training.metrics", raising=False)
    code, stderr = run_cli(registry, capsys, "evaluate", "2.0.0")
    assert code == 2 and "needs the training extras" in stderr and "pip install '.[train]'" in stderr


def test_a_cells_entries_give_the_lowest_probability_in_first_seen_order() -> None:
    from datasets.reviewed import cell_groups
    from model.preprocess import lowest_per_cell

    names = np.array(["c", "a", "a", "b"])  # a reviewed half cell "a" is two entries (its views)
    first, groups = cell_groups(names)
    assert list(names[first]) == ["c", "a", "b"]
    np.testing.assert_allclose(
        lowest_per_cell(np.array([0.9, 0.8, 0.3, 0.1]), groups, len(first)), [0.9, 0.3, 0.1]
    )


def test_a_quick_look_with_limit_records_no_verdict_and_keeps_the_full_report(
    registry: Registry, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models, "held_out_sets", lambda reviewed, limit: {"elpv_test": four_cells()})
    assert run_cli(registry, capsys, "promote", "1.0.0")[0] == 0
    assert cli(["--root", str(registry.root), "evaluate", "2.0.0", "--limit", "4"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["promote"] is False and "quick look at 4 ELPV test cells" in printed["reason"]
    evaluation = registry.root / "2.0.0" / "evaluation"
    assert printed["report"].endswith("quick-report.md") and (evaluation / "quick-report.json").is_file()
    assert not (evaluation / "report.json").exists()
    code, stderr = run_cli(registry, capsys, "promote", "2.0.0")
    assert_one_line_error(code, stderr, "2.0.0 has no recorded evaluation")
    # the whole held-out set records a verdict the promotion can rely on
    assert cli(["--root", str(registry.root), "evaluate", "2.0.0"]) == 0
    assert (evaluation / "report.json").is_file()
    assert json.loads(registry.path.read_text())["versions"]["2.0.0"]["evaluation"]["against"] == "1.0.0"
