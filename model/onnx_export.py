"""ONNX export of the cell classifier, its parity check, and INT8 static quantization.

Owns: the exported graph's contract (input `image` (N, 1, S, S) float32 grey levels 0..255; outputs
`probability` (N,) and `cam` (N, h, w), the class activation map as logits per position), the checker,
the PyTorch/ONNX parity test, and the INT8 variant calibrated on training cells.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

INPUT_NAME = "image"
PROBABILITY_OUTPUT = "probability"
CAM_OUTPUT = "cam"
OPSET = 17
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The exported graph failed the checker or disagrees with PyTorch."""


class ModelFileError(ValueError):
    """An ONNX file that is missing or that onnxruntime cannot load."""


def export_onnx(model: object, path: Path, image_size: int) -> Path:
    """Write `model` (a CellClassifier in eval mode) as ONNX with a dynamic batch dimension."""
    import onnx
    import torch

    assert isinstance(model, torch.nn.Module)
    model.eval()
    example = torch.zeros(2, 1, image_size, image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[PROBABILITY_OUTPUT, CAM_OUTPUT],
        dynamic_axes={INPUT_NAME: {0: "batch"}, PROBABILITY_OUTPUT: {0: "batch"}, CAM_OUTPUT: {0: "batch"}},
        opset_version=OPSET,
        dynamo=False,
    )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    log.info("exported %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def onnx_session(path: Path, threads: int = 0) -> object:
    """An onnxruntime CPU session for a graph that keeps the contract (`check_contract`)."""
    import onnxruntime as ort

    if not path.is_file():
        raise ModelFileError(f"expected an ONNX model file at {path}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) per cause
        raise ModelFileError(f"onnxruntime cannot load {path}: {' '.join(str(exc).split())}") from exc
    check_contract(path, [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    return session


def check_contract(path: Path, inputs: list[str], outputs: list[str]) -> None:
    """Refuse a graph whose tensor names are not the contract's: it loads, but every caller feeds
    `image` and reads `probability`, and would fail later with onnxruntime's less telling message."""
    if inputs != [INPUT_NAME] or not {PROBABILITY_OUTPUT, CAM_OUTPUT} <= set(outputs):
        raise ModelFileError(
            f"{path} is not a pvqc cell classifier: expected the input {INPUT_NAME!r} and the outputs "
            f"{PROBABILITY_OUTPUT!r} and {CAM_OUTPUT!r}; it has input(s) {inputs} and output(s) {outputs}"
        )


def onnx_probabilities(session: object, cells: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Probabilities for (N, S, S) uint8 cells through an onnxruntime session."""
    out = []
    for start in range(0, len(cells), batch_size):
        batch = cells[start : start + batch_size].astype(np.float32)[:, None]
        out.append(session.run([PROBABILITY_OUTPUT], {INPUT_NAME: batch})[0])  # type: ignore[attr-defined]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def check_parity(
    model: object, onnx_path: Path, cells: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> float:
    """Max |p_torch - p_onnx| over real cells; raises ExportError above `tolerance`."""
    import torch

    assert isinstance(model, torch.nn.Module)
    with torch.no_grad():
        expected = model(torch.from_numpy(cells.astype(np.float32))[:, None])[0].numpy()
    got = onnx_probabilities(onnx_session(onnx_path), cells)
    difference = float(np.abs(expected - got).max())
    if difference > tolerance:
        raise ExportError(
            f"ONNX and PyTorch disagree by {difference:.2e} on probabilities (allowed {tolerance:.0e})"
        )
    return difference


class _CellCalibration:
    """Feeds calibration cells to onnxruntime's static quantizer, one small batch at a time."""

    def __init__(self, cells: np.ndarray, batch_size: int = 16) -> None:
        self.batches = iter(
            [cells[i : i + batch_size].astype(np.float32)[:, None] for i in range(0, len(cells), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def head_nodes(path: Path) -> list[str]:
    """Names of the nodes between the last activation and the outputs (heat map, pooling, sigmoid).

    The heat map is a one-output-channel Conv (the linear head at every position); the backbone's
    convolutions, with many output channels, end the walk.
    """
    import onnx

    graph = onnx.load(str(path)).graph
    producer = {output: node for node in graph.node for output in node.output}
    out_channels = {tensor.name: tensor.dims[0] for tensor in graph.initializer if tensor.dims}
    names: list[str] = []
    pending = [output.name for output in graph.output]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node.op_type in ("Clip", "Relu") or node.name in names:
            continue
        if node.op_type == "Conv" and out_channels.get(node.input[1]) != 1:
            continue
        names.append(node.name)
        pending.extend(node.input)
    return names


# the stem and EfficientNet-Lite0's first block (its depthwise and pointwise convolutions): the layers
# that run at full feature resolution on features closest to the grey levels
FLOAT_LEADING_CONVS = 3


def leading_nodes(path: Path, count: int = FLOAT_LEADING_CONVS) -> list[str]:
    """The first `count` convolutions, which read the input and its first features (ONNX nodes are in
    topological order)."""
    import onnx

    graph = onnx.load(str(path)).graph
    return [node.name for node in graph.node if node.op_type == "Conv"][:count]


def quantize_int8(fp32_path: Path, int8_path: Path, calibration_cells: np.ndarray) -> Path:
    """Static INT8 quantization (QDQ, per-channel 7-bit weights) calibrated on training cells.

    Weights use 7 of their 8 bits (`reduce_range`): x86 CPUs without VNNI multiply u8 x s8 pairs into
    saturating 16-bit sums, and with full-range weights 1.2.0's INT8 graph lost 4 points of test
    accuracy on such a CPU (AMD EPYC, AVX2) while it tracked FP32 on an AVX-512 VNNI Xeon.

    The stem and the first block stay in float (`leading_nodes`): they read the grey levels and the
    first features, and quantizing them was most of the INT8 graph's error. Chosen on 895 non-test
    cells (the validation split and 600 training cells outside the calibration set), one view, 1.2.1's
    FP32 graph: mean |p_int8 - p_fp32| 0.031 with everything quantized, 0.016 with the stem in float
    (1.2.1), 0.0085 with the first block too, and 0.007 with the first five convolutions, which cost
    about a fifth of the INT8 speed; the first block's cost was within the noise (AMD EPYC, AVX-512
    VNNI, 2 cores). Percentile calibration instead of min-max was no better on 1.2.2 (0.0083 against
    0.0085, the same 5 of 895 verdicts changed) and needs the activations of every calibration cell in
    memory: 256 cells did not fit in 24 GB.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.source = _CellCalibration(calibration_cells)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return self.source.get_next()

    prepared = int8_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(prepared),
            str(int8_path),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # the heat map and the final pooling stay in float: they are cheap, and quantizing the
            # probability itself would clip it to the calibration cells' range
            nodes_to_exclude=head_nodes(fp32_path) + leading_nodes(fp32_path),
            reduce_range=True,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    finally:
        prepared.unlink(missing_ok=True)
    log.info("quantized %s -> %s (%.1f MB)", fp32_path, int8_path, int8_path.stat().st_size / 1e6)
    return int8_path
