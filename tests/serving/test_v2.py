"""Open Inference Protocol through the stock tritonclient.http client, plus malformed tensors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient._plugin import InferenceServerClientPlugin
from tritonclient._request import Request
from tritonclient.utils import InferenceServerException

from serving.app import create_app
from serving.routes import v2
from tests.serving.conftest import MakeSettings
from tests.serving.helpers import AUTH, TINY_SIZE, TINY_VERSION


class BearerKey(InferenceServerClientPlugin):
    """tritonclient's plugin hook: adds the API key to every request."""

    def __call__(self, request: Request) -> None:
        request.headers.update(AUTH)


MODEL = "pvqc-cell"


@pytest.fixture
def triton_client(live_server: str) -> triton.InferenceServerClient:
    client = triton.InferenceServerClient(url=live_server)
    client.register_plugin(BearerKey())  # every call carries the key, as a line's client would
    return client


def cells(n: int, level: float) -> np.ndarray:
    return np.full((n, 1, TINY_SIZE, TINY_SIZE), level, np.float32)


def test_health_and_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready(MODEL) and triton_client.is_model_ready(MODEL, TINY_VERSION)
    assert not triton_client.is_model_ready(MODEL, "9.9.9")
    metadata = triton_client.get_model_metadata(MODEL)
    assert metadata["versions"] == [TINY_VERSION]
    assert metadata["inputs"] == [
        {"name": "image", "datatype": "FP32", "shape": [-1, 1, TINY_SIZE, TINY_SIZE]}
    ]
    assert [o["name"] for o in metadata["outputs"]] == ["probability", "cam"]
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_matches_the_model(triton_client: triton.InferenceServerClient, binary: bool) -> None:
    batch = np.concatenate([cells(2, 51.0), cells(1, 204.0)])
    tensor = triton.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("probability", "cam")]
    result = triton_client.infer(
        MODEL, [tensor], model_version=TINY_VERSION, outputs=outputs, request_id="r1"
    )
    np.testing.assert_allclose(result.as_numpy("probability"), [0.8, 0.8, 0.2], atol=1e-5)
    assert result.as_numpy("cam").shape == (3, 4, 4)
    response = result.get_response()
    assert response["model_version"] == TINY_VERSION and response["id"] == "r1"


def test_binary_input_with_json_output(triton_client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("image", [1, 1, TINY_SIZE, TINY_SIZE], "FP32")
    tensor.set_data_from_numpy(cells(1, 0.0), binary_data=True)
    result = triton_client.infer(
        MODEL, [tensor], outputs=[triton.InferRequestedOutput("probability", binary_data=False)]
    )
    assert result.as_numpy("probability").tolist() == [1.0]


@pytest.mark.parametrize(
    ("shape", "datatype", "words"),
    [
        ([1, 1, 16, 16], "FP32", "shape"),
        ([1, 3, TINY_SIZE, TINY_SIZE], "FP32", "shape"),
        ([1, 1, TINY_SIZE, TINY_SIZE], "FP16", "datatype"),
    ],
    ids=["wrong-size", "wrong-channels", "wrong-datatype"],
)
def test_wrong_tensors_are_protocol_errors(
    triton_client: triton.InferenceServerClient, shape: list[int], datatype: str, words: str
) -> None:
    tensor = triton.InferInput("image", shape, datatype)
    dtype = np.float16 if datatype == "FP16" else np.float32
    tensor.set_data_from_numpy(np.zeros(shape, dtype), binary_data=True)
    with pytest.raises(InferenceServerException, match=words) as caught:
        triton_client.infer(MODEL, [tensor])
    assert caught.value.status() == "400"
    assert triton_client.is_server_ready()


def test_unknown_model_and_version(triton_client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("image", [1, 1, TINY_SIZE, TINY_SIZE], "FP32")
    tensor.set_data_from_numpy(cells(1, 1.0))
    with pytest.raises(InferenceServerException, match="unknown model"):
        triton_client.infer("other-model", [tensor])
    with pytest.raises(InferenceServerException, match="no version"):
        triton_client.infer(MODEL, [tensor], model_version="7")


def test_raw_malformed_requests(live_server: str) -> None:
    url = f"http://{live_server}/v2/models/{MODEL}/infer"
    header = {
        "inputs": [
            {
                "name": "image",
                "shape": [1, 1, TINY_SIZE, TINY_SIZE],
                "datatype": "FP32",
                "parameters": {"binary_data_size": TINY_SIZE * TINY_SIZE * 4},
            }
        ]
    }
    head = json.dumps(header).encode()
    short = httpx.post(
        url, content=head + b"\0" * 10, headers={**AUTH, "Inference-Header-Content-Length": str(len(head))}
    )
    assert short.status_code == 400 and "bytes" in short.json()["error"]
    bad_json = httpx.post(url, content=b"{not json", headers=AUTH)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]
    few = {
        "inputs": [
            {"name": "image", "shape": [1, 1, TINY_SIZE, TINY_SIZE], "datatype": "FP32", "data": [1.0, 2.0]}
        ]
    }
    assert "values" in httpx.post(url, json=few, headers=AUTH).json()["error"]
    nan = {"inputs": [{"name": "image", "shape": [1, 1, 1, 1], "datatype": "FP32", "data": [float("nan")]}]}
    assert httpx.post(url, content=json.dumps(nan), headers=AUTH).status_code == 400
    length = httpx.post(url, content=head, headers={**AUTH, "Inference-Header-Content-Length": "99999"})
    assert length.status_code == 400 and "Inference-Header-Content-Length" in length.json()["error"]
    # latin-1 superscript two: str.isdigit() says yes, int() says no (a real socket: TestClient re-encodes it)
    odd = httpx.post(url, content=head, headers={**AUTH, "Inference-Header-Content-Length": b"\xb2"})
    assert odd.status_code == 400 and "byte count" in odd.json()["error"]
    # leading zeros count towards int()'s digit limit; they are dropped before it
    padded = "0" * 5000 + str(len(head))
    zeros = httpx.post(url, content=head, headers={**AUTH, "Inference-Header-Content-Length": padded})
    assert zeros.status_code != 500, zeros.text


# -- through the app directly: where parsing runs, what a hot swap does, malformed bodies ----------

INFER = f"/v2/models/{MODEL}/infer"


def valid_request() -> dict[str, Any]:
    return {
        "id": "r1",
        "parameters": {"binary_data_output": False},
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [1, 1, TINY_SIZE, TINY_SIZE],
                "parameters": {},
                "data": [0.0] * (TINY_SIZE * TINY_SIZE),
            }
        ],
        "outputs": [{"name": "probability", "parameters": {"binary_data": False}}],
    }


@pytest.fixture
def app_client(make_settings: MakeSettings) -> Iterator[TestClient]:
    """The app in-process, answering a bug with its 500 (as a client sees it) instead of raising it."""
    with TestClient(create_app(make_settings()), headers=AUTH, raise_server_exceptions=False) as client:
        yield client


def test_json_tensors_are_parsed_off_the_event_loop(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a JSON tensor near the body limit takes seconds to parse: every line would wait that long
    seen: list[tuple[str, bool]] = []

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # worker threads run no event loop
            return False
        return True

    def loads(text: Any, **options: Any) -> Any:
        seen.append(("json.loads", on_loop()))
        return json.loads(text, **options)

    real_tensor = v2._json_tensor

    def json_tensor(*args: Any) -> Any:
        seen.append(("_json_tensor", on_loop()))
        return real_tensor(*args)

    recording_json = SimpleNamespace(loads=loads, dumps=json.dumps, JSONDecodeError=json.JSONDecodeError)
    monkeypatch.setattr(v2, "json", recording_json)
    monkeypatch.setattr(v2, "_json_tensor", json_tensor)
    response = app_client.post(INFER, json=valid_request())
    assert response.status_code == 200, response.text
    assert seen == [("json.loads", False), ("_json_tensor", False)]


def test_the_answer_names_the_model_that_computed_it(
    app_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    services = app_client.app.state.services  # type: ignore[attr-defined]
    served = services.runtime
    promoted = dataclasses.replace(served, card=served.card.model_copy(update={"version": "9.9.9"}))
    real_infer = services.batcher.infer

    async def promote_while_inferring(batch: np.ndarray, runtime: Any = None) -> dict[str, np.ndarray]:
        services.runtime = promoted  # a hot swap lands while the request's batch is in flight
        return await real_infer(batch, runtime)

    monkeypatch.setattr(services.batcher, "infer", promote_while_inferring)
    try:
        response = app_client.post(INFER, json=valid_request())
    finally:
        services.runtime = served
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == TINY_VERSION  # the model that computed the outputs


def _with(path: tuple[str | int, ...], value: Any) -> bytes:
    """A valid request with the value at `path` replaced (the whole body for an empty path)."""
    if not path:
        return json.dumps(value).encode()
    request: Any = valid_request()
    target = request
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(request).encode()


BIG = "9" * 400  # past float64, within Python's int digit limit
HUGE = "1" * 5000  # past Python's int digit limit (4300)

MALFORMED: dict[str, tuple[bytes, dict[str, Any], str]] = {
    "request parameters a list": (_with(("parameters",), [1]), {}, "parameters"),
    "output parameters a number": (_with(("outputs", 0, "parameters"), 5), {}, "parameters"),
    "input parameters a string": (_with(("inputs", 0, "parameters"), "x"), {}, "parameters"),
    "binary_data_output not a boolean": (
        _with(("parameters", "binary_data_output"), "yes"),
        {},
        "true or false",
    ),
    "binary_data not a boolean": (_with(("outputs", 0, "parameters", "binary_data"), 1), {}, "true or false"),
    "id not a string": (_with(("id",), 7), {}, "id"),
    "400-digit integer in data": (
        _with(("inputs", 0, "data", 0), 0).replace(b"[0, ", f"[{BIG}, ".encode(), 1),
        {},
        "FP32",
    ),
    "5000-digit integer in the body": (f'{{"id": {HUGE}}}'.encode(), {}, "digits"),
    "5000-digit header length": (
        _with((), valid_request()),
        {"Inference-Header-Content-Length": HUGE},
        "byte count",
    ),
    "nested too deeply": (b"[" * 100_000 + b"]" * 100_000, {}, "deep"),
}


@pytest.mark.parametrize("case", list(MALFORMED), ids=list(MALFORMED))
def test_malformed_requests_are_400_saying_what_was_expected(app_client: TestClient, case: str) -> None:
    body, headers, words = MALFORMED[case]
    response = app_client.post(INFER, content=body, headers={"Content-Type": "application/json", **headers})
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]
    assert len(response.json()["error"]) < 300  # what was sent is quoted briefly, never echoed whole
    assert app_client.post(INFER, json=valid_request()).status_code == 200  # and it keeps serving


SLOTS: list[tuple[str | int, ...]] = [
    (),
    ("id",),
    ("parameters",),
    ("parameters", "binary_data_output"),
    ("inputs",),
    ("inputs", 0),
    ("inputs", 0, "name"),
    ("inputs", 0, "datatype"),
    ("inputs", 0, "shape"),
    ("inputs", 0, "shape", 0),
    ("inputs", 0, "parameters"),
    ("inputs", 0, "parameters", "binary_data_size"),
    ("inputs", 0, "data"),
    ("inputs", 0, "data", 0),
    ("outputs",),
    ("outputs", 0),
    ("outputs", 0, "name"),
    ("outputs", 0, "parameters"),
    ("outputs", 0, "parameters", "binary_data"),
]
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**38, max_value=10**400)
    | st.floats()
    | st.text(alphabet="ab1.é²", max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(alphabet="ab", max_size=2), inner, max_size=3)
    ),
    max_leaves=8,
)


def test_no_malformed_request_is_a_server_error(make_settings: MakeSettings) -> None:
    with TestClient(create_app(make_settings()), headers=AUTH, raise_server_exceptions=False) as client:

        @settings(max_examples=200, deadline=None)
        @given(slot=st.sampled_from(SLOTS), value=JSON_VALUES)
        def check(slot: tuple[str | int, ...], value: Any) -> None:
            response = client.post(INFER, content=_with(slot, value))
            assert response.status_code in (200, 400), (slot, value, response.text)
            if response.status_code == 400:
                assert response.json()["error"]

        check()


def test_a_batch_larger_than_the_whole_queue_is_413_not_a_retry(app_client: TestClient) -> None:
    app_client.app.state.services.batcher.max_queue_cells = 1  # type: ignore[attr-defined]
    request = valid_request()
    request["inputs"][0]["shape"] = [2, 1, TINY_SIZE, TINY_SIZE]
    request["inputs"][0]["data"] = [0.0] * (2 * TINY_SIZE * TINY_SIZE)
    response = app_client.post(INFER, json=request)
    assert response.status_code == 413 and "Retry-After" not in response.headers
    assert "this request is 2 model inputs and the queue holds at most 1" in response.text
    assert 'pvqc_rejected_requests_total{reason="too_large"} 1.0' in app_client.get("/metrics").text
