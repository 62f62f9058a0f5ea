"""The model card: the JSON beside each ONNX file that tells serving how to use it.

Owns: the card's schema (input size, colour mode, tensor names, class meaning, operating points,
metrics, provenance, licence), reading and writing it, and the PASS / REVIEW / FAIL rule for a cell.
Serving takes its behaviour from the card, never from constants of its own.
"""

from __future__ import annotations

import enum
import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CARD_FILE = "card.json"
# the release that `make run`, the benchmarks and the evaluation use unless told otherwise;
# models/pvqc-cell/registry.json records the same version as active. Anchored at the checkout, so
# `pvqc serve` finds it from any working directory.
SHIPPED_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "pvqc-cell" / "1.2.2"
ELPV_LICENCE_NOTE = (
    "Trained on the ELPV dataset (Buerhop-Lutz et al., Deitsch et al.), whose images are licensed "
    "CC BY-NC-SA 4.0: this model is for non-commercial evaluation. A factory retrains it on its own "
    "reviewed frames (pvqc's retraining loop) before production use."
)


class CardError(ValueError):
    """A model card that is missing, unreadable or lacks required fields."""


class CellVerdict(enum.StrEnum):
    FUNCTIONAL = "functional"
    UNCERTAIN = "uncertain"
    DEFECTIVE = "defective"


class TensorSpec(BaseModel):
    name: str
    shape: list[int | str]
    datatype: str


class InputSpec(BaseModel):
    tensor: TensorSpec
    size: int = Field(gt=0, description="cells are resized to size x size before inference")
    colour: str = Field(description="'grey': one channel of raw grey levels 0..255")
    value_range: tuple[float, float] = (0.0, 255.0)
    normalisation: str = "inside the graph"


class OperatingPoints(BaseModel):
    """A cell is defective at p >= threshold, uncertain at review_threshold <= p < threshold."""

    threshold: float = Field(gt=0.0, lt=1.0)
    review_threshold: float = Field(gt=0.0, lt=1.0)
    threshold_rule: str
    review_rule: str

    @model_validator(mode="after")
    def review_below_threshold(self) -> OperatingPoints:
        if self.review_threshold > self.threshold:
            raise ValueError("expected review_threshold <= threshold")
        return self

    def judge(self, probability: float) -> CellVerdict:
        if not math.isfinite(probability):  # NaN compares false with both thresholds: never functional
            return CellVerdict.UNCERTAIN
        if probability >= self.threshold:
            return CellVerdict.DEFECTIVE
        if probability >= self.review_threshold:
            return CellVerdict.UNCERTAIN
        return CellVerdict.FUNCTIONAL


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    architecture: str
    input: InputSpec
    outputs: list[TensorSpec]
    classes: dict[str, str]
    operating_points: OperatingPoints
    metrics: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    licence: str = ELPV_LICENCE_NOTE
    files: dict[str, str] = Field(default_factory=dict, description="variant -> ONNX file name")

    @property
    def probability_output(self) -> str:
        return self.outputs[0].name

    def onnx_path(self, folder: Path, variant: str = "fp32") -> Path:
        if variant not in self.files:
            raise CardError(
                f"model {self.name} {self.version} has no {variant!r} file; has {sorted(self.files)}"
            )
        return folder / self.files[variant]


def read_card(folder: Path) -> ModelCard:
    path = folder / CARD_FILE
    if not path.is_file():
        raise CardError(f"expected a model card at {path}")
    try:
        return ModelCard.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValidationError) as exc:
        fields = ""
        if isinstance(exc, ValidationError):
            fields = ", ".join(".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in exc.errors())
        raise CardError(f"model card {path} is not valid: {fields or exc}") from exc


def write_card(card: ModelCard, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / CARD_FILE
    path.write_text(json.dumps(card.model_dump(mode="json"), indent=2) + "\n")
    return path
