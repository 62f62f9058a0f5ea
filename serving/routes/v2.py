"""Open Inference Protocol (KServe / Triton "V2") for the bare cell classifier, `pvqc-cell`.

Owns: server and model health and metadata, and `infer` with JSON tensors and the binary tensor
extension (`Inference-Header-Content-Length` splits the body into a JSON header and raw tensor
bytes; `binary_data_size` gives each tensor's length). Inference goes through the same
micro-batcher as the ingestion routes. Errors use the protocol's `{"error": "..."}` form, so the
stock `tritonclient.http` client reads them.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from serving.app import Services
from serving.auth import Role, require
from serving.deps import BodyDep, ServicesDep
from serving.errors import ApiError
from serving.inference import QueueFullError

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
# the health routes stay open for probes; everything about the model needs a key (tritonclient
# sends one through its `headers=` argument or a plugin)
LINE = [Depends(require(Role.LINE))]

HEADER_LENGTH = "Inference-Header-Content-Length"
SERVER_NAME = "pvqc"
EXTENSIONS = ["binary_tensor_data"]
DATATYPE = "FP32"
NUMPY_OF = {"FP32": np.dtype("<f4")}


@router.get("", dependencies=LINE)
async def server_metadata() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        server_version = version("pvqc")
    except PackageNotFoundError:
        server_version = "0"
    return {"name": SERVER_NAME, "version": server_version, "extensions": EXTENSIONS}


@router.get("/health/live")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready")
async def ready(services: ServicesDep) -> Response:
    return _readiness(services)


@router.get("/models/{name}", dependencies=LINE)
@router.get("/models/{name}/versions/{version}", dependencies=LINE)
async def model_metadata(services: ServicesDep, name: str, version: str | None = None) -> dict[str, Any]:
    _check_model(services, name, version)
    runtime = services.runtime
    size = runtime.size
    session_outputs = {o.name: o.shape for o in runtime.session.get_outputs()}
    return {
        "name": runtime.card.name,
        "versions": [runtime.card.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": runtime.input_name, "datatype": DATATYPE, "shape": [-1, 1, size, size]}],
        "outputs": [
            {
                "name": name,
                "datatype": DATATYPE,
                "shape": [d if isinstance(d, int) else -1 for d in session_outputs[name]],
            }
            for name in runtime.output_names
        ],
    }


@router.get("/models/{name}/ready", dependencies=LINE)
@router.get("/models/{name}/versions/{version}/ready", dependencies=LINE)
async def model_ready(services: ServicesDep, name: str, version: str | None = None) -> Response:
    _check_model(services, name, version)
    return _readiness(services)


@router.post("/models/{name}/infer", dependencies=LINE)
@router.post("/models/{name}/versions/{version}/infer", dependencies=LINE)
async def infer(
    services: ServicesDep, request: Request, body: BodyDep, name: str, version: str | None = None
) -> Response:
    _check_model(services, name, version)
    header, binary = _split_body(body, request.headers.get(HEADER_LENGTH))
    batch = _input_tensor(services, header, binary)
    wanted = _requested_outputs(services, header)
    runtime = services.runtime  # checked against above, with no await between: a swap cannot intervene
    try:
        values = await services.batcher.infer(batch, runtime)
    except QueueFullError as exc:
        retry = str(services.settings.retry_after_seconds)
        raise ApiError(503, f"inference queue is full: {exc}; retry later", {"Retry-After": retry}) from exc
    return _infer_response(services, header, wanted, values)


def _readiness(services: Services) -> Response:
    if services.batcher.running:
        return JSONResponse({"ready": True})
    return JSONResponse({"error": "model worker is not running"}, status_code=503)


def _check_model(services: Services, name: str, version: str | None) -> None:
    card = services.runtime.card
    if name != card.name:
        raise ApiError(404, f"unknown model {name!r}; this server serves {card.name!r}")
    if version is not None and version != card.version:
        raise ApiError(404, f"model {name!r} has no version {version!r}; it serves version {card.version!r}")


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise ApiError(
                400, f"{HEADER_LENGTH} is {header_length!r}; expected a byte count <= the body's {len(body)}"
            )
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        header = json.loads(json_part)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"inference request header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ApiError(400, "expected the inference request to be a JSON object")
    return header, binary


def _input_tensor(services: Services, header: dict[str, Any], binary: bytes) -> np.ndarray:
    runtime = services.runtime
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, f"expected exactly one input tensor, {runtime.input_name!r}")
    tensor = inputs[0]
    if tensor.get("name") != runtime.input_name:
        raise ApiError(400, f"unknown input {tensor.get('name')!r}; expected {runtime.input_name!r}")
    if tensor.get("datatype") != DATATYPE:
        raise ApiError(
            400, f"input {runtime.input_name!r} has datatype {tensor.get('datatype')!r}; expected {DATATYPE}"
        )
    shape = tensor.get("shape")
    size = runtime.size
    limit = services.settings.max_v2_batch
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[1:] != [1, size, size]
        or not 1 <= shape[0] <= limit
    ):
        raise ApiError(
            400,
            f"input shape {shape!r} is not accepted; expected [N, 1, {size}, {size}] with 1 <= N <= {limit}",
        )
    count = int(np.prod(shape))
    parameters = tensor.get("parameters") or {}
    if "binary_data_size" in parameters:
        array = _binary_tensor(parameters["binary_data_size"], binary, count)
    else:
        if binary:
            raise ApiError(
                400,
                f"{len(binary)} bytes of binary data follow the header, but no input names binary_data_size",
            )
        array = _json_tensor(tensor.get("data"), count)
    if not np.isfinite(array).all():
        raise ApiError(400, "input contains NaN or infinite values; expected grey levels 0..255")
    return array.reshape(shape)


def _binary_tensor(declared: object, binary: bytes, count: int) -> np.ndarray:
    expected = count * 4
    if not isinstance(declared, int) or declared != expected:
        raise ApiError(
            400, f"binary_data_size is {declared!r}; an FP32 tensor of {count} values takes {expected} bytes"
        )
    if len(binary) != expected:
        raise ApiError(
            400, f"{len(binary)} bytes of binary tensor data follow the header; expected {expected}"
        )
    return np.frombuffer(binary, dtype=NUMPY_OF[DATATYPE]).astype(np.float32, copy=False)


def _json_tensor(data: object, count: int) -> np.ndarray:
    if not isinstance(data, list):
        raise ApiError(
            400, "expected the input's `data` as a JSON array (or binary_data_size with binary data)"
        )
    try:
        array = np.asarray(data, dtype=np.float32).reshape(-1)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, f"input data is not an array of numbers: {exc}") from exc
    if array.size != count:
        raise ApiError(400, f"input data has {array.size} values; its shape needs {count}")
    return array


def _requested_outputs(services: Services, header: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, binary) per output to return, in the order asked for."""
    default_binary = bool((header.get("parameters") or {}).get("binary_data_output", False))
    asked = header.get("outputs")
    if asked is None:
        return [(name, default_binary) for name in services.runtime.output_names]
    if not isinstance(asked, list):
        raise ApiError(400, "expected `outputs` to be a list")
    wanted = []
    for output in asked:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in services.runtime.output_names:
            raise ApiError(
                400, f"unknown output {name!r}; the model has {list(services.runtime.output_names)}"
            )
        binary = bool((output.get("parameters") or {}).get("binary_data", default_binary))
        wanted.append((name, binary))
    return wanted


def _infer_response(
    services: Services, header: dict[str, Any], wanted: list[tuple[str, bool]], values: dict[str, np.ndarray]
) -> Response:
    card = services.runtime.card
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in wanted:
        value = np.ascontiguousarray(values[name], dtype="<f4")
        entry: dict[str, Any] = {"name": name, "datatype": DATATYPE, "shape": list(value.shape)}
        if binary:
            raw = value.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = value.reshape(-1).tolist()
        outputs.append(entry)
    reply: dict[str, Any] = {"model_name": card.name, "model_version": card.version, "outputs": outputs}
    if "id" in header:
        reply["id"] = header["id"]
    head = json.dumps(reply).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )
