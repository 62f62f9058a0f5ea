"""Open Inference Protocol through the stock tritonclient.http client, plus malformed tensors."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient._plugin import InferenceServerClientPlugin
from tritonclient._request import Request
from tritonclient.utils import InferenceServerException

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
