"""Training configuration: one dataclass, read from a YAML/JSON file, unknown keys refused.

Owns: every knob of a training run and its validation, so a typo in a config ends the run with a
one-line message instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.preprocess import INPUT_SIZE


class ConfigError(ValueError):
    """A configuration file that is missing, unreadable, or names an unknown key or bad value."""


@dataclass
class TrainConfig:
    architecture: str = "efficientnet_lite0"
    pretrained: bool = True
    image_size: int = INPUT_SIZE
    epochs: int = 30
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.15
    drop_rate: float = 0.2
    # blur pooling at every subsampling block (model/network.py), for verdicts a pixel's shift moves less.
    # None: none from ImageNet, and from a release (init_from) whatever that release's network has, so a
    # fine-tune from the registry needs no edit after a blurred release is promoted; true from a release
    # without it adds it (the blur has no weights)
    anti_alias: bool | None = None
    # brightness/contrast jitter amplitude (fraction); applied to raw grey levels
    jitter: float = 0.2
    # camera-like augmentation (training/augment.py), so that a verdict survives the module geometry's
    # cut: window shift (fraction of the side), window scale, rotation, blur of imaging at down to
    # resample_min of the input size, shading across the cell, sensor noise (grey levels)
    shift: float = 0.0
    scale: float = 0.0
    rotate_degrees: float = 0.0
    resample_min: float = 1.0
    shading: float = 0.0
    noise_sigma: float = 0.0
    # weight of a consistency term (0: off): each cell is also seen as the camera and the cutter deliver it
    # (its own brightness/contrast and camera-like draws), and the Jensen-Shannon divergence between the
    # verdicts on the two copies is added to the loss. Augmentation alone teaches the verdict to be right on
    # average; this teaches it not to move, which is what a borderline cell cut from a noisy frame needs.
    # It costs a second forward pass per cell
    consistency: float = 0.0
    # stem + blocks[:freeze_blocks] keep their ImageNet weights; with cache_frozen their outputs for the
    # 8 dihedral views are computed once, which makes a CPU run several times faster
    freeze_blocks: int = 0
    cache_frozen: bool = False
    # weights averaged over the training steps with this decay per step (0: off); validation, best.pt and
    # so the export use the average, which smooths the last epochs' noise on a small data set
    ema_decay: float = 0.0
    # a released model folder (card.json + model.onnx) to start from instead of ImageNet, or a registry folder
    # (models/pvqc-cell: its active version when the run starts): a fine-tune of the active model, hours
    # shorter than a run from ImageNet on a CPU. Its batch norms arrive folded, so their statistics stay
    # frozen for the whole run
    init_from: str | None = None
    # dihedral views averaged when validating each epoch (8: all; fewer saves time on a CPU)
    validation_views: int = 8
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    # at most this many training / validation cells (smoke runs); None: all
    limit_train: int | None = None
    limit_validation: int | None = None
    out_dir: str = "runs/train"
    # folders written by `pvqc export-reviewed`; their modules' train / validation parts join ELPV's
    reviewed_sets: list[str] = dataclasses.field(default_factory=list)
    # sampling weight of each reviewed set's cells relative to an ELPV cell (1.0 each when empty);
    # with any weight other than 1 the epoch draws its cells with replacement by weight
    reviewed_weights: list[float] = dataclasses.field(default_factory=list)

    @property
    def camera_augmentation(self) -> bool:
        """Whether any camera-like augmentation is on (training/augment.py's CameraAugment)."""
        return (
            bool(self.shift or self.scale or self.rotate_degrees or self.shading or self.noise_sigma)
            or self.resample_min < 1
        )

    def validate(self) -> None:
        """Refuse values no run can use, before any data loads or any file is written. What this machine
        has (a GPU for device: cuda) is the training script's check: a sweep of GPU runs is checked here on
        a machine without one before the GPU machine's time is spent."""
        from model.network import PRETRAINED_SOURCES

        checks = [
            (
                self.architecture in PRETRAINED_SOURCES,
                f"unknown architecture {self.architecture!r}; expected one of {sorted(PRETRAINED_SOURCES)}",
            ),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (0 < self.lr < math.inf, "lr must be a number > 0"),
            (0 <= self.weight_decay < math.inf, "weight_decay must be a number >= 0"),
            (0 <= self.drop_rate < 1, "drop_rate must be in [0, 1)"),
            # numpy's global seed takes 32 bits, and each rank seeds with seed + rank
            (0 <= self.seed < 2**31, "seed must be in 0..2147483647"),
            (self.threads >= 0, "threads must be >= 0 (0: all cores)"),
            (
                self.limit_train is None or self.limit_train >= 1,
                "limit_train must be >= 1 cells (or null: all)",
            ),
            (
                self.limit_validation is None or self.limit_validation >= 1,
                "limit_validation must be >= 1 cells (or null: all)",
            ),
            (bool(self.out_dir.strip()), "out_dir must name a folder"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (
                self.image_size == INPUT_SIZE,
                f"image_size must be {INPUT_SIZE}: cells are trained at their native size (the card "
                "tells serving this size, and downscaling loses thin cracks)",
            ),
            (self.freeze_blocks >= 0, "freeze_blocks must be >= 0"),
            (not self.cache_frozen or self.freeze_blocks > 0, "cache_frozen needs freeze_blocks > 0"),
            (0 <= self.consistency < math.inf, "consistency must be a number >= 0 (0: off)"),
            (
                not self.consistency or self.camera_augmentation,
                "consistency needs camera-like augmentation (shift, scale, rotate_degrees, resample_min, "
                "shading or noise_sigma): it compares a cell with its camera-augmented copy",
            ),
            (not self.consistency or not self.cache_frozen, "consistency cannot use cache_frozen inputs"),
            (1 <= self.validation_views <= 8, "validation_views must be in 1..8"),
            (0 <= self.ema_decay < 1, "ema_decay must be in [0, 1) (0: no weight average)"),
            (0 <= self.jitter < 1, "jitter must be in [0, 1)"),
            (0 <= self.shift < 0.5, "shift must be in [0, 0.5)"),
            (0 <= self.scale < 0.5, "scale must be in [0, 0.5)"),
            (0 <= self.rotate_degrees <= 45, "rotate_degrees must be in [0, 45]"),
            (0.1 <= self.resample_min <= 1, "resample_min must be in [0.1, 1]"),
            (0 <= self.shading < 1, "shading must be in [0, 1)"),
            (0 <= self.noise_sigma < math.inf, "noise_sigma must be a number >= 0"),
            (
                not self.cache_frozen or not self.camera_augmentation,
                "shift, scale, rotate_degrees, resample_min, shading and noise_sigma need cache_frozen: "
                "false (cached features are computed once and cannot be augmented)",
            ),
            (self.device in ("auto", "cpu", "cuda"), "device must be auto, cpu or cuda"),
            (
                not self.reviewed_weights or len(self.reviewed_weights) == len(self.reviewed_sets),
                "reviewed_weights must give one weight per reviewed set",
            ),
            (all(0 < w < math.inf for w in self.reviewed_weights), "reviewed_weights must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)


def config_from_mapping(values: dict[str, Any]) -> TrainConfig:
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; expected some of {sorted(known)}")
    config = typed_config(values)
    config.validate()
    return config


def typed_config(values: dict[str, Any]) -> TrainConfig:
    """The config with every value of its field's type: `epochs: ten` or `pretrained: "no"` is refused,
    where a plain constructor would keep the string (and "no" would count as true)."""
    from pydantic import TypeAdapter, ValidationError

    types = typing.get_type_hints(TrainConfig)
    typed: dict[str, Any] = {}
    problems = []
    for key, value in values.items():
        try:
            # strict: no string-to-number or string-to-bool coercion; an int still serves for a float
            typed[key] = TypeAdapter(types[key]).validate_python(value, strict=True)
        except ValidationError as exc:
            expected = " or ".join(sorted({error["msg"].lower() for error in exc.errors()}))
            problems.append(f"{key}: {expected}, got {value!r}")
    if problems:
        raise ConfigError(f"bad config value(s): {'; '.join(problems)}")
    return TrainConfig(**typed)


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    values: dict[str, Any] = {}
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"expected a config file at {path}")
        try:
            text = path.read_text()
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except Exception as exc:
            kind = path.suffix.lstrip(".").upper() or "JSON"
            # the parsers' messages run over several lines; the promise is one line
            raise ConfigError(f"{path} is not valid {kind} text: {' '.join(str(exc).split())}") from exc
        if not isinstance(values, dict):
            raise ConfigError(f"expected {path} to hold a mapping of config keys")
    # an override of null is kept: `--set init_from=null` or `limit_train=null` means none
    values.update(overrides or {})
    return config_from_mapping(values)
