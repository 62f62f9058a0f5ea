"""Train the cell classifier on ELPV: `python -m training.train --config CONFIG` (or `pvqc train`).

Reads top to bottom: set-up (config, seeds, DDP), data (fixed split, never the test cells), model
(ImageNet weights from a package, optional frozen early blocks), optional cache of the frozen features
for the 8 dihedral views, the epoch loop (soft BCE, dihedral, brightness/contrast and camera-like
augmentation from training/augment.py, AdamW with one-cycle, bf16 autocast on CUDA, channels-last),
validation averaged over dihedral views, checkpoints, CSV and TensorBoard.

Runs under `torchrun --nproc-per-node N` (gloo on CPU, nccl on CUDA): each process takes an equal share of
the epoch's cells, gradients and the logged training loss are all-reduced, rank 0 alone writes and prints.
Everything random in an epoch is seeded from (seed, epoch, rank) when the epoch starts, so a run stopped
with `--stop-after` and continued with `--resume` repeats the uninterrupted run.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import platform
import random
import re
import sys
import time
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from datasets.elpv import DatasetError, ElpvCells, elpv_root, load_elpv, read_labels, split_indices
from datasets.reviewed import cell_groups
from model.card import ModelCard
from model.network import (
    CellClassifier,
    WeightsError,
    bernoulli_js,
    build_classifier,
    load_released,
    soft_bce,
)
from model.preprocess import lowest_per_cell
from model.registry import file_sha256
from training.augment import CameraAugment, camera_batch, dihedral_batch, jitter_batch
from training.config import ConfigError, TrainConfig, load_config
from training.metrics import classification_metrics

log = logging.getLogger("training.train")
CHECKPOINT_FORMAT = "pvqc-checkpoint-1"
# what export and evaluation read from any checkpoint (a slim one drops only the optimizer's state)
CHECKPOINT_KEYS = ("config", "model", "epoch", "best_auc", "history", "validation")


# ----------------------------------------------------------------------------------------------- set-up


def setup_distributed(config: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but no CUDA GPU is available here; expected cpu or auto")
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if world > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def is_root_process() -> bool:
    """Whether this process is rank 0 (or the only one): the one that writes files and prints."""
    return int(os.environ.get("RANK", "0")) == 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds; epoch_seed gives 63-bit ones
    torch.manual_seed(seed)


# what an epoch seed is for: streams of the same (seed, epoch, rank) must not draw the same numbers
ORDER_STREAM, AUGMENT_STREAM, GLOBAL_STREAM = 0, 1, 2


def epoch_seed(seed: int, epoch: int, rank: int, stream: int) -> int:
    """A seed computed from scratch for one epoch of one rank: nothing random carries over from the epoch
    before, so a resumed run draws exactly what an uninterrupted one drew."""
    state = np.random.SeedSequence([seed, epoch, rank, stream]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))  # 63 bits: what torch.Generator.manual_seed takes as an int


def epoch_order(
    weights: np.ndarray, by_weight: bool, seed: int, epoch: int, rank: int, world: int
) -> torch.Tensor:
    """This rank's cells (indices) for one epoch.

    Every rank draws the same permutation (or, with `by_weight`, the same draw with replacement) and
    takes its own interleaved share. The draw is padded by repeating its start up to a multiple of
    `world`, as DistributedSampler does, so every rank runs the same number of batches: a rank with one
    batch fewer would leave the others waiting forever in the gradient all-reduce. Padding rather than
    dropping the remainder keeps every cell in every epoch (a few are seen twice), which matters for
    small reviewed sets.
    """
    n = len(weights)
    shared = torch.Generator().manual_seed(epoch_seed(seed, epoch, 0, ORDER_STREAM))  # rank 0's on every rank
    order = torch.multinomial(torch.from_numpy(weights).float(), n, replacement=by_weight, generator=shared)
    padded = math.ceil(n / world) * world
    return order.repeat(math.ceil(padded / n))[:padded][rank::world]


def epoch_loss(running: float, seen: int, world: int, device: torch.device) -> float:
    """Mean training loss of the epoch over all ranks' cells, not only this rank's share."""
    totals = torch.tensor([running, float(seen)], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals)  # sums: the loss-weighted cells and the cells, over every rank
    return float(totals[0] / totals[1].clamp(min=1))


# ------------------------------------------------------------------------------------------------- data


def training_cells(config: TrainConfig) -> tuple[ElpvCells, ElpvCells]:
    """(train, validation) ELPV cells under the fixed split; the test cells are never loaded here."""
    root = elpv_root()
    _, probabilities, types = read_labels(root / "labels.csv")
    train_idx, val_idx, _ = split_indices(probabilities, types)
    if config.limit_train is not None:
        train_idx = train_idx[: config.limit_train]
    if config.limit_validation is not None:
        val_idx = val_idx[: config.limit_validation]
    return load_elpv(root, train_idx), load_elpv(root, val_idx)


def with_reviewed(
    config: TrainConfig, train: ElpvCells, val: ElpvCells
) -> tuple[ElpvCells, ElpvCells, np.ndarray]:
    """ELPV plus the reviewed sets' train and validation modules (their test modules stay out),
    and each training cell's sampling weight (1 for ELPV cells, the set's weight for its cells)."""
    from datasets.reviewed import Part, concatenate, load_reviewed

    weights = [np.ones(len(train))]
    trains, vals = [train], [val]
    for i, folder in enumerate(config.reviewed_sets):
        weight = config.reviewed_weights[i] if config.reviewed_weights else 1.0
        part_train = load_reviewed(Path(folder), Part.TRAIN, train.images.shape[-1])
        part_val = load_reviewed(Path(folder), Part.VALIDATION, train.images.shape[-1])
        log.info(
            "reviewed set %s: %d training and %d validation cells, weight %g",
            folder,
            len(part_train),
            len(part_val),
            weight,
        )
        trains.append(part_train)
        vals.append(part_val)
        weights.append(np.full(len(part_train), weight))
    return concatenate(trains), concatenate(vals), np.concatenate(weights)


@torch.no_grad()
def cache_early_features(
    model: CellClassifier, images: np.ndarray, upto: int, device: torch.device, batch_size: int
) -> torch.Tensor:
    """(8, N, C, h, w) float16 features of the frozen part for every dihedral view of every cell."""
    model.eval()
    views = []
    for v in range(8):
        chunks = []
        for start in range(0, len(images), batch_size):
            grey = torch.from_numpy(images[start : start + batch_size]).float()[:, None].to(device)
            grey = dihedral_batch(grey, torch.full((grey.shape[0],), v, device=device))
            chunks.append(model.early_features(grey, upto).half().cpu())
        views.append(torch.cat(chunks))
        log.info("cached frozen features for view %d/8", v + 1)
    return torch.stack(views)


# ------------------------------------------------------------------------------------------------ model


class TrainingView(nn.Module):
    """What DDP wraps: logits from grey cells, or from cached early features when `from_features`."""

    def __init__(self, model: CellClassifier, start: int, from_features: bool) -> None:
        super().__init__()
        self.model, self.start, self.from_features = model, start, from_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.from_features:
            with torch.set_grad_enabled(self.start == 0 and torch.is_grad_enabled()):
                x = self.model.early_features(x, self.start)
        return self.model.logits_from_features(self.model.late_features(x.float(), self.start))


def early_modules(model: CellClassifier, blocks: int) -> list[nn.Module]:
    return [model.backbone.conv_stem, model.backbone.bn1, *model.backbone.blocks[:blocks]]


def freeze_early(model: CellClassifier, blocks: int) -> None:
    """Keep stem and blocks[:blocks] at their starting weights (and their batch-norm statistics)."""
    if blocks > model.num_blocks:
        raise ConfigError(f"freeze_blocks={blocks} but {model.architecture} has {model.num_blocks} blocks")
    for module in early_modules(model, blocks):
        module.eval()
        for p in module.parameters():
            p.requires_grad_(False)


def set_train_mode(model: CellClassifier, frozen_blocks: int, frozen_norms: bool = False) -> None:
    """Training mode but for the frozen blocks, and with `frozen_norms` (a run started from a released
    graph, whose batch norms are folded) every batch norm, whose batch statistics would undo the fold."""
    model.train()
    if frozen_blocks:
        for module in early_modules(model, frozen_blocks):
            module.eval()
    if frozen_norms:
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()


def start_weights(config: TrainConfig) -> tuple[CellClassifier, str, dict[str, Any] | None]:
    """The network to train, where its weights come from, and for a run from a release (init_from)
    what the card records of it: version, the graph's sha256 and what that release learned from."""
    if config.init_from is None:
        # the config records the network built, so its checkpoints rebuild the same one
        config.anti_alias = bool(config.anti_alias)
        model, source = build_classifier(
            config.architecture, config.pretrained, config.drop_rate, anti_alias=config.anti_alias
        )
        return model, source, None
    named = Path(config.init_from)
    folder = release_folder(named)
    card, graph, digest = release_to_start_from(folder, config.architecture)
    config.anti_alias = network_anti_alias(card, folder, config.anti_alias)
    model, _ = build_classifier(
        config.architecture, pretrained=False, drop_rate=config.drop_rate, anti_alias=config.anti_alias
    )
    loaded = load_released(model, graph)
    started_from = {
        "name": card.name,
        "version": card.version,
        "folder": str(folder),
        "registry": str(named) if folder != named else None,
        "sha256": digest,
        "weights": card.provenance.get("weights", "not recorded"),
        "training_data": card.provenance.get("training_data"),
        "reviewed_sets": card.provenance.get("reviewed_sets", []),
        "started_from": card.provenance.get("started_from"),
    }
    # what that release learned from is in started_from, which the card keeps beside this line
    return model, f"fine-tuned from {card.name} {card.version}, {loaded}", started_from


def release_folder(named: Path) -> Path:
    """The release folder init_from names: itself, or for a model registry folder (one holding
    registry.json, e.g. models/pvqc-cell) its active version, so a fine-tune config need not be edited
    after every promotion."""
    from model.registry import REGISTRY_FILE, Registry, RegistryError

    if not (named / REGISTRY_FILE).is_file():
        return named
    registry = Registry(named)
    try:
        active = registry.active()
        if active is None:
            raise ConfigError(
                f"init_from: the registry {named} has no active version; expected a registry with one, "
                "or a released model folder (card.json + model.onnx)"
            )
        return registry.folder(active)
    except (RegistryError, OSError) as exc:
        raise ConfigError(f"init_from: {exc}") from exc


def release_to_start_from(folder: Path, architecture: str) -> tuple[ModelCard, Path, str]:
    """The card, FP32 graph and the graph's sha256 of the release init_from names, checked: a folder
    that is no release, a network of another architecture, or a graph that is not the file its card
    records is refused in one line."""
    from model.card import CardError, read_card

    expected = "expected a released model folder (card.json + model.onnx)"
    try:
        card = read_card(folder)
        graph = card.onnx_path(folder, "fp32")
    except (CardError, OSError) as exc:
        raise ConfigError(f"init_from: {exc}; {expected}") from exc
    if not graph.is_file():
        raise ConfigError(f"init_from: {graph} is missing; {expected}")
    if card.architecture != architecture:
        raise ConfigError(
            f"init_from: {folder} holds a {card.architecture} network; the config says {architecture}"
        )
    recorded = card.provenance.get("sha256")
    digest = file_sha256(graph)
    if isinstance(recorded, dict) and recorded.get(graph.name, digest) != digest:
        raise ConfigError(f"init_from: {graph} does not match the sha256 its card records")
    return card, graph, digest


def network_anti_alias(card: ModelCard, folder: Path, requested: bool | None) -> bool:
    """Whether a run from this release has blur pooling: the release's own network unless the config
    asks for the blur (it has no weights, so adding it to a release without it is a fine-tune like any
    other). Dropping a release's blur is refused: its features were learned through it."""
    config = card.provenance.get("config")
    released = bool(config.get("anti_alias")) if isinstance(config, dict) else False
    if requested is None:
        return released
    if released and not requested:
        raise ConfigError(
            f"init_from: {folder} holds a network with blur pooling; anti_alias: false would drop it "
            "(leave anti_alias unset to keep it)"
        )
    return requested


# ---------------------------------------------------------------------------------------- checkpoints


def torch_save(obj: object, path: Path) -> None:
    """torch.save, with a path it cannot write (its parent missing, say) reported as the OSError it is:
    torch's zip writer raises RuntimeError for those, which the scripts would not recognise."""
    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        raise OSError(f"cannot write {path}: {' '.join(str(exc).split())}") from exc


def os_problem(exc: OSError) -> str:
    """One line for a failed file operation: what went wrong and where."""
    if exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    return " ".join(str(exc).split())


def save_checkpoint(path: Path, **state: Any) -> None:
    tmp = path.with_suffix(".tmp")
    torch_save({"format": CHECKPOINT_FORMAT, **state}, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a half checkpoint


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A pvqc checkpoint; anything else ends with a message saying what was expected."""
    if not path.is_file():
        raise WeightsError(f"expected a checkpoint file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise WeightsError(f"{path} is not a readable PyTorch checkpoint: {exc}") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise WeightsError(f"{path} is not a pvqc checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    missing = [key for key in CHECKPOINT_KEYS if key not in state]
    if missing or not isinstance(state["config"], dict) or "architecture" not in state["config"]:
        raise WeightsError(
            f"{path} is an incomplete pvqc checkpoint: expected the keys {list(CHECKPOINT_KEYS)} and a "
            f"config naming its architecture; missing {missing or ['config.architecture']}"
        )
    return state


def model_from_checkpoint(state: dict[str, Any], architecture: str | None = None) -> CellClassifier:
    """Rebuild the network a checkpoint holds; refuse one of another architecture."""
    saved = state["config"]["architecture"]
    if architecture is not None and architecture != saved:
        raise WeightsError(f"the checkpoint holds a {saved} network; expected {architecture}")
    model = CellClassifier(
        saved,
        drop_rate=state["config"].get("drop_rate", 0.2),
        anti_alias=bool(state["config"].get("anti_alias", False)),
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise WeightsError(f"the checkpoint's weights do not fit {saved}: {state_dict_problem(exc)}") from exc
    return model.eval()


def state_dict_problem(exc: RuntimeError) -> str:
    """One line from torch's many-line load_state_dict error: the first mismatch and how many there are."""
    details = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
    if not details:
        return str(exc).strip()
    more = f" (and {len(details) - 1} more)" if len(details) > 1 else ""
    return f"{details[0]}{more}"


def restore(
    path: Path,
    config: TrainConfig,
    model: CellClassifier,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.OneCycleLR,
    world: int = 1,
    average: AveragedModel | None = None,
    started_from: dict[str, Any] | None = None,
) -> tuple[int, float, list[dict[str, float]], str | None]:
    """Load a last.pt into a run built from the same config; returns (next epoch, best AUC, history,
    the hardware it was trained on so far). With `average` (ema_decay), the checkpoint's "model" is the
    average and its "training_model" the weights the optimizer moves. `started_from` is the release
    init_from gives now (start_weights; None from ImageNet): it must be the one the run started from."""
    state = load_checkpoint(path)
    saved = state["config"]
    if "optimizer" not in state or "scheduler" not in state:
        raise ConfigError(f"cannot resume: {path} holds no optimizer state (a slim checkpoint); use last.pt")
    if saved["architecture"] != config.architecture:
        raise WeightsError(
            f"cannot resume: {path} holds a {saved['architecture']} network; the config says "
            f"{config.architecture}"
        )
    # blur pooling keeps no weights of its own, so the weights would load either way into another network
    if bool(saved.get("anti_alias", False)) != config.anti_alias:
        raise WeightsError(
            f"cannot resume: {path} holds a network {'with' if saved.get('anti_alias') else 'without'} blur "
            f"pooling; the config says anti_alias: {str(config.anti_alias).lower()}"
        )
    # each process's share of an epoch, and so the schedule and the draws, depend on the process
    # count: a resume repeats the uninterrupted run only on as many processes as it started on
    trained_on = int(state.get("world_size", world))
    if trained_on != world:
        raise ConfigError(
            f"cannot resume: {path} was trained on {trained_on} process(es), this run has {world}; "
            f"resume it with torchrun --nproc-per-node {trained_on}"
        )
    if state["scheduler"]["total_steps"] != scheduler.total_steps:
        raise ConfigError(
            f"cannot resume: {path} was scheduled for {saved['epochs']} epochs of "
            f"{saved['batch_size']} cells; "
            f"the config says {config.epochs} of {config.batch_size}"
        )
    refuse_other_start(path, config, saved.get("init_from"), state.get("started_from"), started_from)
    # the weight of the consistency term is part of the loss every step minimised; changed halfway, the
    # run would be neither the one it started as nor the one the config describes
    saved_consistency = saved.get("consistency", 0.0)
    if saved_consistency != config.consistency:
        raise ConfigError(
            f"cannot resume: {path} was trained with consistency {saved_consistency}; the config says "
            f"{config.consistency}"
        )
    # the decay shapes every later step of the average, so a resume keeps it exactly (0: none kept)
    saved_decay = saved.get("ema_decay", 0.0)
    if saved_decay != config.ema_decay:
        raise ConfigError(
            f"cannot resume: {path} was trained with ema_decay {saved_decay}; the config says "
            f"{config.ema_decay} (a weight average is either kept from the start or not at all)"
        )
    try:
        if average is None:
            model.load_state_dict(state["model"])
        else:
            model.load_state_dict(state["training_model"])
            average.module.load_state_dict(state["model"])
            average.n_averaged.fill_(int(state["ema_steps"]))
    except RuntimeError as exc:
        raise WeightsError(f"cannot resume: {path}'s weights do not fit: {state_dict_problem(exc)}") from exc
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as exc:
        raise ConfigError(
            f"cannot resume: {path} was trained with other parameters frozen (freeze_blocks "
            f"{saved.get('freeze_blocks')}; the config says {config.freeze_blocks})"
        ) from exc
    scheduler.load_state_dict(state["scheduler"])
    log.info("resumed from %s after epoch %d", path, state["epoch"] + 1)
    return state["epoch"] + 1, state["best_auc"], state["history"], state.get("training_hardware")


def refuse_other_start(
    path: Path,
    config: TrainConfig,
    saved_start: str | None,
    saved_release: dict[str, Any] | None,
    release: dict[str, Any] | None,
) -> None:
    """ConfigError unless the resumed run starts where the checkpoint did: from ImageNet both, or from
    the same release graph (by sha256), whether init_from names its folder or a registry whose active
    version it was."""
    # a run from a release keeps its batch norms frozen; resumed from elsewhere they would train
    if (saved_start is None) != (config.init_from is None):
        raise ConfigError(
            f"cannot resume: {path} started from {saved_start or 'ImageNet'}; the config says "
            f"init_from {config.init_from or 'null (ImageNet)'}"
        )
    if release is None:  # from ImageNet, as the checkpoint was
        return
    if saved_release is None:  # a checkpoint from before runs recorded their release: its init_from
        if saved_start != config.init_from:
            raise ConfigError(
                f"cannot resume: {path} started from {saved_start}; "
                f"the config says init_from {config.init_from}"
            )
        return
    # a registry's active version may have changed since the run started: the weights resumed on top of
    # another release would be recorded as a fine-tune of a release they never started from
    if saved_release.get("sha256") != release["sha256"]:
        raise ConfigError(
            f"cannot resume: {path} started from {saved_release.get('name')} {saved_release.get('version')} "
            f"({saved_release.get('folder')}); init_from {config.init_from} now gives {release['name']} "
            f"{release['version']}: set init_from to {saved_release.get('folder')}"
        )


def training_hardware(device: torch.device, world: int, earlier: str | None = None) -> str:
    """What this run trains on, for the model card: the exporting machine is often another one."""
    if device.type == "cuda":
        here = f"{world} x {torch.cuda.get_device_name(device)}"
    else:
        cpu = f"{platform.machine()} {platform.processor()}".strip()
        here = f"{world} CPU process(es) on {cpu}, {os.cpu_count()} cores"
    if earlier and earlier != here and not earlier.endswith(f"resumed on {here}"):
        return f"{earlier}; resumed on {here}"
    return earlier or here


# ------------------------------------------------------------------------------------------- evaluate


@torch.no_grad()
def predict_views(
    view_model: TrainingView,
    inputs: torch.Tensor,
    device: torch.device,
    batch_size: int,
    cached: bool,
    views: int = 8,
) -> np.ndarray:
    """Probabilities averaged over the first `views` dihedral views. `inputs`: (8, N, ...) cached or
    (N, 1, H, W) grey."""
    view_model.eval()
    n = inputs.shape[1] if cached else inputs.shape[0]
    total = torch.zeros(n)
    for v in range(views):
        for start in range(0, n, batch_size):
            if cached:
                x = inputs[v, start : start + batch_size].to(device)
            else:
                grey = inputs[start : start + batch_size].to(device)
                x = dihedral_batch(grey, torch.full((grey.shape[0],), v, device=device))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                x = x.contiguous(memory_format=torch.channels_last)
                total[start : start + batch_size] += torch.sigmoid(view_model(x).float()).cpu()
    return (total / views).numpy()


# ----------------------------------------------------------------------------------------------- main


def weight_average(model: CellClassifier, decay: float) -> AveragedModel | None:
    """An exponential moving average of the weights and batch-norm statistics, or None for decay 0."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def weight_average_state(model: CellClassifier, average: AveragedModel | None) -> dict[str, Any]:
    """What a checkpoint needs beside the average to resume: the optimizer's weights and the step count."""
    if average is None:
        return {}
    return {"training_model": model.state_dict(), "ema_steps": int(average.n_averaged)}


def camera_augment(config: TrainConfig) -> CameraAugment:
    """The config's camera-like augmentations: its keys of the same names as CameraAugment's fields."""
    return CameraAugment(**{f.name: getattr(config, f.name) for f in dataclasses.fields(CameraAugment)})


def main(config: TrainConfig, resume: Path | None = None, stop_after: int | None = None) -> dict[str, Any]:
    """Train; `stop_after` ends this process after that many epochs in total (the schedule still spans
    `config.epochs`), so a run can be split over time-boxed machines and continued with `resume`."""
    out = Path(config.out_dir)
    if out.exists() and not out.is_dir():  # every rank checks: none may start while rank 0 gives up
        raise ConfigError(f"out_dir {out} is a file; expected a folder for the run (existing or new)")
    rank, world, device = setup_distributed(config)
    is_main = rank == 0
    seed_everything(config.seed + rank)
    if config.threads:
        torch.set_num_threads(config.threads)

    # the network first: missing ImageNet weights end the run before minutes of data loading
    model, weights_source, started_from = start_weights(config)
    frozen_norms = config.init_from is not None
    start_block = config.freeze_blocks
    if start_block:
        freeze_early(model, start_block)
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot make out_dir {out} ({os_problem(exc)}); expected a folder for the run"
            ) from exc
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2))

    train, val = training_cells(config)
    sample_weights = np.ones(len(train))
    reviewed_sources: list[dict[str, Any]] = []
    if config.reviewed_sets:
        from datasets.reviewed import reviewed_provenance

        reviewed_sources = reviewed_provenance(config.reviewed_sets, config.reviewed_weights)  # as trained on
        train, val, sample_weights = with_reviewed(config, train, val)
    # uniform weights: every cell once per epoch; otherwise draw by weight, with replacement
    by_weight = bool(np.any(sample_weights != 1.0))
    log.info(
        "training on %d cells, validating on %d (world size %d, %s)", len(train), len(val), world, device
    )

    # channels-last: about 1.7x faster training on this CPU (oneDNN) and the fast layout on CUDA too
    model.to(device).to(memory_format=torch.channels_last)

    targets = torch.from_numpy(train.probabilities).float()
    if config.cache_frozen:
        train_inputs = cache_early_features(model, train.images, start_block, device, 16)
        val_inputs = cache_early_features(model, val.images, start_block, device, 16)
    else:
        # on a GPU the uint8 cells (about 170 MB) live there, so a batch costs no host-to-device copy
        train_inputs = torch.from_numpy(train.images)[:, None].to(device)
        val_inputs = torch.from_numpy(val.images)[:, None].float()

    view_model = TrainingView(model, start_block, config.cache_frozen)
    average = weight_average(model, config.ema_decay)
    # what validation scores and best.pt keeps: the average when there is one
    scored_view = view_model
    if average is not None:
        averaged = typing.cast(CellClassifier, average.module)
        scored_view = TrainingView(averaged, start_block, config.cache_frozen)
    wrapped: nn.Module = view_model
    if world > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            view_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    per_rank = math.ceil(len(train) / world)
    steps_per_epoch = max(1, math.ceil(per_rank / config.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=config.epochs * steps_per_epoch,
        pct_start=config.warmup_fraction,
    )
    first_epoch, best_auc = 0, -1.0
    history: list[dict[str, float]] = []
    earlier_hardware = None
    if resume is not None:
        first_epoch, best_auc, history, earlier_hardware = restore(
            resume, config, model, optimizer, scheduler, world, average, started_from
        )
    hardware = training_hardware(device, world, earlier_hardware)

    writer = None
    if is_main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tensorboard"))
    from tqdm import tqdm

    camera = camera_augment(config)
    val_first, val_groups = cell_groups(val.names)
    last_epoch = config.epochs if stop_after is None else min(config.epochs, stop_after)
    for epoch in range(first_epoch, last_epoch):
        started = time.perf_counter()
        order = epoch_order(sample_weights, by_weight, config.seed, epoch, rank, world)
        # augmentation draws and the global RNG (dropout) start afresh each epoch from (seed, epoch, rank):
        # a resumed epoch draws what it drew in an uninterrupted run, and each rank draws its own
        generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, rank, AUGMENT_STREAM))
        seed_everything(epoch_seed(config.seed, epoch, rank, GLOBAL_STREAM))
        set_train_mode(model, start_block, frozen_norms)
        running, seen = 0.0, 0
        batches = range(0, len(order), config.batch_size)
        for start in tqdm(
            batches, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not is_main, mininterval=10
        ):
            index = order[start : start + config.batch_size]
            views = torch.randint(0, 8, (len(index),), generator=generator)
            if config.cache_frozen:
                x = train_inputs[views, index].to(device)
            else:
                grey = dihedral_batch(train_inputs[index.to(device)].float(), views.to(device))
                x = jitter_batch(grey, config.jitter, generator)
                if camera.enabled:
                    x = camera_batch(x, camera, generator)
                if config.consistency:
                    x = torch.cat([grey, x])  # each cell as stored, then as a camera delivers it
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = wrapped(x).float()
            loss = training_loss(logits, targets[index].to(device), config.consistency)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            if average is not None:
                average.update_parameters(model)
            running += float(loss.detach()) * len(index)
            seen += len(index)

        val_prob = predict_views(
            scored_view, val_inputs, device, 64, config.cache_frozen, config.validation_views
        )
        # model selection on one verdict per cell, as the line gets it (a reviewed half cell is two views)
        cell_prob = lowest_per_cell(val_prob, val_groups, len(val_first))
        metrics = classification_metrics(cell_prob, val.probabilities[val_first], val.types[val_first], 0.5)
        val_loss = float(
            soft_bce(
                torch.logit(torch.from_numpy(cell_prob).clamp(1e-6, 1 - 1e-6)),
                torch.from_numpy(val.probabilities[val_first]).float(),
            )
        )
        row = {
            "epoch": epoch + 1,
            "train_loss": epoch_loss(running, seen, world, device),
            "val_loss": val_loss,
            "val_accuracy": metrics["accuracy"],
            "val_auc": metrics["roc_auc"] if metrics["roc_auc"] is not None else float("nan"),
            "lr": scheduler.get_last_lr()[0],
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        if is_main:
            log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in row.items()})
            assert writer is not None
            for key, value in row.items():
                if key != "epoch":
                    writer.add_scalar(key, value, epoch + 1)
            write_history(out / "metrics.csv", history)
            improved = not math.isnan(row["val_auc"]) and row["val_auc"] > best_auc
            best_auc = max(best_auc, row["val_auc"]) if improved else best_auc
            state = {
                "config": asdict(config),
                "model": scored_view.model.state_dict(),
                **weight_average_state(model, average),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "best_auc": best_auc,
                "history": history,
                "weights_source": weights_source,
                "started_from": started_from,
                "training_hardware": hardware,
                "world_size": world,
                "reviewed_sets": reviewed_sources,
                "validation": {
                    "names": val.names.tolist(),
                    "probabilities": val_prob.tolist(),
                    "labels": val.probabilities.tolist(),
                    "types": val.types.tolist(),
                    "views": config.validation_views,
                },
            }
            save_checkpoint(out / "last.pt", **state)
            # the first epoch of a run always writes best.pt (its AUC may be NaN on a tiny validation
            # set); a resumed run keeps the best.pt it has unless an epoch beats it
            if improved or epoch == 0:
                save_checkpoint(out / "best.pt", **state)
    if writer is not None:
        writer.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"out_dir": str(out), "best_val_auc": best_auc, "epochs": len(history)}


def training_loss(logits: torch.Tensor, targets: torch.Tensor, consistency: float) -> torch.Tensor:
    """Soft BCE against the labels; with a consistency weight the batch holds each cell twice (as stored,
    then camera-augmented) and the divergence between the two verdicts is added."""
    if not consistency:
        return soft_bce(logits, targets)
    stored, camera = logits.chunk(2)
    return soft_bce(logits, targets.repeat(2)) + consistency * bernoulli_js(stored, camera)


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


# a number as people type it: JSON refuses .001 and 1.
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def override_value(raw: str) -> Any:
    """One --set value: JSON where it parses (numbers, true/false, lists); else true/false in any case
    (Python's True), a number as Python writes it (.001, 1.), or the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if NUMBER.fullmatch(raw):
        return int(raw) if raw.lstrip("+-").isdigit() else float(raw)
    return raw


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs, each value read by `override_value`."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"expected key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        overrides[key] = override_value(raw)
    return overrides


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML or JSON file of TrainConfig keys")
    parser.add_argument(
        "--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help="override config keys"
    )
    parser.add_argument("--resume", type=Path, help="continue from a last.pt checkpoint")
    parser.add_argument(
        "--stop-after", type=int, help="end after this many epochs; continue later with --resume"
    )
    args = parser.parse_args(argv)
    if args.stop_after is not None and args.stop_after < 1:
        parser.error(f"--stop-after expects a number of epochs >= 1, got {args.stop_after}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config, parse_overrides(args.set))
        result = main(config, args.resume, args.stop_after)
    except (ConfigError, DatasetError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a file where a folder should be, a disk that is full, a file not readable
        print(f"error: {os_problem(exc)}; expected readable inputs and a writable out_dir", file=sys.stderr)
        return 2
    if is_root_process():  # one result line per run, not one per rank
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
