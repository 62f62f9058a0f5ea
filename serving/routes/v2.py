"""Open Inference Protocol (KServe / Triton "V2") for the bare cell classifier, `pvqc-cell`.

Owns: server and model health and metadata, and `infer` with JSON tensors and the binary tensor
extension (`Inference-Header-Content-Length` splits the body into a JSON header and raw tensor
bytes; `binary_data_size` gives each tensor's length). Inference goes through the same
micro-batcher as the ingestion routes. Errors use the protocol's `{"error": "..."}` form, so the
stock `tritonclient.http` client reads them; a malformed request is a 400 that says what was
expected, never a 500. Parsing a JSON tensor takes seconds near the body limit, so the request is
parsed and converted in a worker thread, never on the event loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from serving.app import Services
from serving.auth import Role, require
from serving.deps import BodyDep, ServicesDep, header_count
from serving.errors import ApiError
from serving.inference import ModelRuntime, QueueFullError

router = APIRouter(prefix="/v2", tags=["open inference protocol"])
# the health routes stay open for probes; everything about the model needs a key (tritonclient
# sends one through its `headers=` argument or a plugin)
LINE = [Depends(require(Role.LINE))]

HEADER_LENGTH = "Inference-Header-Content-Length"
SERVER_NAME = "pvqc"
EXTENSIONS = ["binary_tensor_data"]
DATATYPE = "FP32"
NUMPY_OF = {"FP32": np.dtype("<f4")}


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: what to run and how to answer."""

    header: dict[str, Any]
    batch: np.ndarray  # (N, 1, S, S) float32 grey levels
    wanted: list[tuple[str, bool]]  # (output name, as binary) in the order asked for


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
    runtime = services.runtime
    _check_model(runtime, name, version)
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
    _check_model(services.runtime, name, version)
    return _readiness(services)


@router.post("/models/{name}/infer", dependencies=LINE)
@router.post("/models/{name}/versions/{version}/infer", dependencies=LINE)
async def infer(
    services: ServicesDep, request: Request, body: BodyDep, name: str, version: str | None = None
) -> Response:
    runtime = services.runtime  # one model for the whole request, whatever a hot swap does meanwhile
    _check_model(runtime, name, version)
    # off the event loop, on a limiter of its own: a large JSON tensor takes seconds to parse and must
    # not hold a frame worker from the lines' posts, nor wait behind their frames
    parsed = await anyio.to_thread.run_sync(
        parse_infer_request,
        body,
        request.headers.get(HEADER_LENGTH),
        runtime,
        services.settings.max_v2_batch,
        limiter=services.v2_parse_limiter,
    )
    services.refuse_never_fits(len(parsed.batch), "this request")
    try:
        values = await services.batcher.infer(parsed.batch, runtime)
    except QueueFullError as exc:
        services.refuse_queue_full(str(exc))
    return _infer_response(runtime, parsed, values)


def _readiness(services: Services) -> Response:
    if services.batcher.running:
        return JSONResponse({"ready": True})
    return JSONResponse({"error": "model worker is not running"}, status_code=503)


def _check_model(runtime: ModelRuntime, name: str, version: str | None) -> None:
    card = runtime.card
    if name != card.name:
        raise ApiError(404, f"unknown model {name!r}; this server serves {card.name!r}")
    if version is not None and version != card.version:
        raise ApiError(404, f"model {name!r} has no version {version!r}; it serves version {card.version!r}")


def parse_infer_request(
    body: bytes, header_length: str | None, runtime: ModelRuntime, max_batch: int
) -> InferRequest:
    """The request in `body` checked against `runtime`; raises ApiError(400). Blocks: call from a thread."""
    header, binary = _split_body(body, header_length)
    if "id" in header and not isinstance(header["id"], str):
        raise ApiError(400, f"request `id` is {_brief(header['id'])}; expected a string")
    batch = _input_tensor(runtime, max_batch, header, binary)
    return InferRequest(header, batch, _requested_outputs(runtime, header))


def _brief(value: object, limit: int = 40) -> str:
    """`value` quoted for an error message, cut short: a client's mistake is never echoed whole."""
    text = repr(value)  # an int's repr stays within Python's digit limit: the JSON parser enforced it
    return text if len(text) <= limit else text[:limit] + "..."


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        length = _header_length(header_length, len(body))
        json_part, binary = body[:length], body[length:]
    try:
        header = json.loads(json_part)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"inference request header is not valid JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"inference request header is not UTF-8 JSON: {exc}") from exc
    except ValueError as exc:  # an integer literal past Python's digit limit (4300 by default)
        raise ApiError(
            400, "inference request header holds an integer of too many digits; expected ordinary numbers"
        ) from exc
    except RecursionError as exc:
        raise ApiError(400, "inference request header is nested too deeply; expected a JSON object") from exc
    if not isinstance(header, dict):
        raise ApiError(400, "expected the inference request to be a JSON object")
    return header, binary


def _header_length(value: str, body_size: int) -> int:
    length = header_count(value)
    if length is None or length > body_size:
        raise ApiError(
            400, f"{HEADER_LENGTH} is {_brief(value)}; expected a byte count <= the body's {body_size}"
        )
    return length


def _parameters(value: object, where: str) -> dict[str, Any]:
    """A protocol `parameters` object: absent, null or a JSON object."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ApiError(400, f"`parameters` of {where} is {_brief(value)}; expected a JSON object")
    return value


def _flag(parameters: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):  # bool("false") is True: a loose reading would flip the answer
        raise ApiError(400, f"{where} parameter {key!r} is {_brief(value)}; expected true or false")
    return value


def _input_tensor(runtime: ModelRuntime, limit: int, header: dict[str, Any], binary: bytes) -> np.ndarray:
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ApiError(400, f"expected exactly one input tensor, {runtime.input_name!r}")
    tensor = inputs[0]
    if tensor.get("name") != runtime.input_name:
        raise ApiError(400, f"unknown input {_brief(tensor.get('name'))}; expected {runtime.input_name!r}")
    if tensor.get("datatype") != DATATYPE:
        raise ApiError(
            400,
            f"input {runtime.input_name!r} has datatype {_brief(tensor.get('datatype'))}; "
            f"expected {DATATYPE}",
        )
    shape = tensor.get("shape")
    size = runtime.size
    if (
        not isinstance(shape, list)
        or len(shape) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or shape[1:] != [1, size, size]
        or not 1 <= shape[0] <= limit
    ):
        raise ApiError(
            400,
            f"input shape {_brief(shape)} is not accepted; "
            f"expected [N, 1, {size}, {size}] with 1 <= N <= {limit}",
        )
    count = int(np.prod(shape))
    parameters = _parameters(tensor.get("parameters"), f"input {runtime.input_name!r}")
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
            400,
            f"binary_data_size is {_brief(declared)}; "
            f"an FP32 tensor of {count} values takes {expected} bytes",
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
    except OverflowError as exc:  # an integer past float64's range (a float past it parses as inf)
        raise ApiError(
            400, f"input data holds a number outside the {DATATYPE} range; expected grey levels 0..255"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise ApiError(400, f"input data is not an array of numbers: {_brief(str(exc), 120)}") from exc
    if array.size != count:
        raise ApiError(400, f"input data has {array.size} values; its shape needs {count}")
    return array


def _requested_outputs(runtime: ModelRuntime, header: dict[str, Any]) -> list[tuple[str, bool]]:
    """(name, binary) per output to return, in the order asked for."""
    request_parameters = _parameters(header.get("parameters"), "the request")
    default_binary = _flag(request_parameters, "binary_data_output", False, "request")
    asked = header.get("outputs")
    if asked is None:
        return [(name, default_binary) for name in runtime.output_names]
    if not isinstance(asked, list):
        raise ApiError(400, "expected `outputs` to be a list")
    wanted = []
    for output in asked:
        name = output.get("name") if isinstance(output, dict) else None
        if name not in runtime.output_names:
            raise ApiError(400, f"unknown output {_brief(name)}; the model has {list(runtime.output_names)}")
        parameters = _parameters(output.get("parameters"), f"output {name!r}")
        wanted.append((name, _flag(parameters, "binary_data", default_binary, f"output {name!r}")))
    return wanted


def _infer_response(runtime: ModelRuntime, parsed: InferRequest, values: dict[str, np.ndarray]) -> Response:
    card = runtime.card  # the model that computed `values`, even if another was promoted meanwhile
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for name, binary in parsed.wanted:
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
    if "id" in parsed.header:
        reply["id"] = parsed.header["id"]
    head = json.dumps(reply).encode()
    if not chunks:
        return Response(head, media_type="application/json")
    return Response(
        b"".join([head, *chunks]),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(head))},
    )
