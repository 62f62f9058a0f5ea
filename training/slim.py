"""Slim files for a lent GPU machine: checkpoints that travel back, ImageNet weights that travel there.

Owns: dropping the optimizer and scheduler state from a pvqc checkpoint (AdamW's two moments triple
its size) and optionally storing the weights in float16, so one Lite0 run comes back in about 7 MB
(a lent machine returns files of at most 16 MB). The result is still a pvqc checkpoint: export and
evaluation read it like any other, and it cannot be resumed (`--resume` needs the full last.pt).
Also: the backbone's ImageNet tensors of a weights package, in order, without its 1000-class head and
optionally in float16, for a machine that cannot install the package (model/network.py reads them
through PVQC_IMAGENET_WEIGHTS); as a starting point, float16 rounding is far below what training moves.

    python -m training.slim checkpoint runs/x/best.pt runs/x/best-slim.pt --half
    python -m training.slim imagenet efficientnet_lite0 var/lite0-imagenet.pt --half
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from model.network import WeightsError
from training.train import load_checkpoint, os_problem, save_checkpoint, torch_save

log = logging.getLogger("training.slim")
# training_model: the raw weights beside an average (ema_decay); export reads the average
TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "training_model")


def slim_state(state: dict[str, Any], half: bool) -> dict[str, Any]:
    """The checkpoint without its training-only state; floating weights in float16 when `half`."""
    slim = {k: v for k, v in state.items() if k not in TRAINING_ONLY_KEYS and k != "format"}
    if half:
        # integer buffers (batch-norm's num_batches_tracked) keep their type
        slim["model"] = {name: t.half() if t.is_floating_point() else t for name, t in state["model"].items()}
    slim["slim"] = {"half": half, "dropped": [k for k in TRAINING_ONLY_KEYS if k in state]}
    return slim


def slim_checkpoint(source: Path, dest: Path, half: bool) -> dict[str, Any]:
    state = load_checkpoint(source)
    dest.parent.mkdir(parents=True, exist_ok=True)  # a new file in a new folder, as `imagenet` allows
    save_checkpoint(dest, **slim_state(state, half))
    summary = {"source": str(source), "dest": str(dest), "bytes": dest.stat().st_size, "half": half}
    log.info("slimmed %s to %s (%d bytes)", source, dest, summary["bytes"])
    return summary


def imagenet_weights(architecture: str, dest: Path, half: bool) -> dict[str, Any]:
    """The package's backbone tensors in their order (what load_pretrained reads), head dropped."""
    from model.network import PRETRAINED_SOURCES, CellClassifier, load_pretrained

    if architecture not in PRETRAINED_SOURCES:
        raise WeightsError(
            f"no ImageNet weights package for {architecture}; expected one of {sorted(PRETRAINED_SOURCES)}"
        )
    model = CellClassifier(architecture)
    source = load_pretrained(model)
    tensors = {
        k: (t.half() if half and t.is_floating_point() else t).clone()
        for k, t in model.backbone.state_dict().items()
        if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch_save(tensors, dest)
    summary: dict[str, Any] = {"architecture": architecture, "source": source, "dest": str(dest)}
    summary["bytes"] = dest.stat().st_size
    log.info("wrote %d ImageNet tensors of %s to %s", len(tensors), architecture, dest)
    return summary


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)
    checkpoint = verbs.add_parser("checkpoint", help="a checkpoint without optimizer state")
    checkpoint.add_argument("source", type=Path, help="a pvqc checkpoint (best.pt or last.pt)")
    checkpoint.add_argument("dest", type=Path)
    imagenet = verbs.add_parser("imagenet", help="a weights package's backbone tensors, in order")
    imagenet.add_argument("architecture")
    imagenet.add_argument("dest", type=Path)
    for verb in (checkpoint, imagenet):
        verb.add_argument("--half", action="store_true", help="store floating weights as float16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.verb == "checkpoint":
            print(json.dumps(slim_checkpoint(args.source, args.dest, args.half)))
        else:
            print(json.dumps(imagenet_weights(args.architecture, args.dest, args.half)))
    except WeightsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # DEST inside a file, a folder that cannot be written, a disk that is full
        print(f"error: {os_problem(exc)}; expected DEST to be a writable file path", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(cli())
