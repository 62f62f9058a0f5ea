"""Module verdicts: the one rule that turns per-cell verdicts into PASS / REVIEW / FAIL.

Owns: the ModuleVerdict and InspectionKind enums and `module_verdict`. FAIL if any cell is defective;
else REVIEW if any cell is uncertain or the frame could not be read as a module; else PASS. A frame
the service could not judge is never PASS.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from model.card import CellVerdict


class ModuleVerdict(enum.StrEnum):
    PASS = "PASS"
    REVIEW = "REVIEW"
    FAIL = "FAIL"


class InspectionKind(enum.StrEnum):
    MODULE = "module"
    CELL = "cell"


def module_verdict(cells: Iterable[CellVerdict], geometry_ok: bool) -> ModuleVerdict:
    verdicts = list(cells)
    if CellVerdict.DEFECTIVE in verdicts:
        return ModuleVerdict.FAIL
    if not geometry_ok or not verdicts or CellVerdict.UNCERTAIN in verdicts:
        return ModuleVerdict.REVIEW
    return ModuleVerdict.PASS
