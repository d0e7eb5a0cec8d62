"""The Open Inference Protocol (KServe v2) beside /v1, and the OpenAPI schema as the contract.

No Serve: `build_http_app` runs over `FakeBackend` (deterministic, cheap answers: the
HTTP layer is what is tested), in-process through Starlette's TestClient for raw JSON
against the spec, and on a uvicorn thread on 127.0.0.1 for `tritonclient[http]`, a
real client of the protocol. One test puts the tiny random BERT behind the same app
(serve/model_store.LoadedModel, still no Serve) to check that /v2 labels equal /v1
labels with the real tokenizer, HTML and over-long reviews included.
"""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from collections import Counter

import numpy as np
import pytest
from starlette.testclient import TestClient

from pipelines.core.ports import free_port
from serve.http_api import build_http_app
from serve.schemas import RequestLimits
from serve.security import ApiKeyGuard

API_KEY = "test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MODEL = "imdb-sentiment"
VERSION = "3"
LABELS = ["negative", "positive"]
LIMITS = RequestLimits(max_texts=8, max_text_chars=2000, max_body_bytes=64 * 1024)
INFER = f"/v2/models/{MODEL}/infer"
REVIEWS = [
    "A moving story with wonderful acting.",
    "Dull, predictable and far too long.",
    "<p>Great <b>fun</b>!<br /><br />Would watch again &amp; again.</p>",
    "An endless, meandering film. " * 60,  # ~1700 characters, far over 64 tokens
    "Ça m'a plu 😀 — زبردست — e\u0301\u0301 \u202ereversed\u202c \x00 ok",
]


def fake_prediction(text: str, name: str = MODEL, version: str = VERSION) -> dict:
    positive = (zlib.crc32(text.encode("utf-8")) % 999 + 1) / 1000  # in (0, 1), never 0.5 exactly
    probabilities = {"negative": 1.0 - positive, "positive": positive}
    label = max(probabilities, key=probabilities.get)
    return {"label": label, "score": probabilities[label], "probabilities": probabilities, "model_name": name, "model_version": version}


class FakeBackend:
    """serve/http_api.Backend without a model."""

    def __init__(self, api_key: str | None = None, limits: RequestLimits = LIMITS, ready: bool = True):
        self.guard = ApiKeyGuard(api_key)
        self._limits = limits
        self.ready = ready
        self.rejections: Counter[str] = Counter()
        self.seen: list[str] = []

    def limits(self) -> RequestLimits:
        return self._limits

    async def predict(self, texts: list[str]) -> list[dict]:
        for text in texts:
            text.encode("utf-8")  # as strict as the Rust tokenizer: a lone surrogate raises (a 500 if it gets here)
        self.seen.extend(texts)
        return [fake_prediction(text) for text in texts]

    def model_info(self) -> dict | None:
        if not self.ready:
            return None
        return {
            "name": MODEL, "version": VERSION, "run_id": None, "aliases": ["champion"], "uri": f"models:/{MODEL}/{VERSION}",
            "labels": list(LABELS), "max_length": 256, "truncation": "head_tail", "test_metrics": {"test/accuracy": 0.9},
            "device": "cpu", "loaded_at": 0.0, "selector": f"models:/{MODEL}@champion", "last_error": None,
        }

    def record_rejection(self, reason: str) -> None:
        self.rejections[reason] += 1


def v2_body(texts: list[str], shape: list[int] | None = None, **extra) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": shape or [len(texts)], "data": texts}], **extra}


def outputs_by_name(response: dict) -> dict[str, dict]:
    return {output["name"]: output for output in response["outputs"]}


def assert_v2_error(response, status: int, words: str = "") -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert words in body["error"], body["error"]
    return body["error"]


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend(API_KEY)


@pytest.fixture
def client(backend) -> TestClient:
    with TestClient(build_http_app(backend), raise_server_exceptions=False) as test_client:
        yield test_client


# --- health and metadata ----------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_v2_health_is_open_and_metadata_needs_the_key(client):
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    for path in ("/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/{VERSION}"):
        response = client.get(path)
        assert_v2_error(response, 401, "missing Authorization")
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert_v2_error(client.get(path, headers={"Authorization": "Bearer wrong"}), 401, "invalid API key")
    server = client.get("/v2", headers=AUTH).json()
    assert server["name"] == "imdb-platform" and isinstance(server["version"], str) and server["extensions"] == []


@pytest.mark.timeout(60)
def test_v2_model_metadata_describes_the_tensors(client):
    metadata = client.get(f"/v2/models/{MODEL}", headers=AUTH).json()
    assert metadata == {
        "name": MODEL,
        "versions": [VERSION],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "INT64", "shape": [-1]},
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
            {"name": "label_name", "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"backend": "torch", "device": "cpu"},
    }
    assert client.get(f"/v2/models/{MODEL}/versions/{VERSION}", headers=AUTH).json() == metadata
    assert client.get(f"/v2/models/{MODEL}/ready", headers=AUTH).json() == {"name": MODEL, "ready": True}
    assert client.get(f"/v2/models/{MODEL}/versions/{VERSION}/ready", headers=AUTH).json() == {"name": MODEL, "ready": True}
    assert_v2_error(client.get("/v2/models/other", headers=AUTH), 404, "unknown model 'other'")
    assert_v2_error(client.get("/v2/models/other/ready", headers=AUTH), 404, "other")
    assert_v2_error(client.get(f"/v2/models/{MODEL}/versions/7", headers=AUTH), 404, "no version '7'")
    assert_v2_error(client.get(f"/v2/models/{MODEL}/versions/7/ready", headers=AUTH), 404, "serves version 3")
    assert_v2_error(client.get("/v2/nothing/here", headers=AUTH), 404)
    assert_v2_error(client.delete(f"/v2/models/{MODEL}", headers=AUTH), 405)


@pytest.mark.timeout(60)
def test_not_ready_replica_says_so_on_v2():
    backend = FakeBackend(ready=False)
    with TestClient(build_http_app(backend), raise_server_exceptions=False) as client:
        assert client.get("/v2/health/live").status_code == 200
        assert_v2_error(client.get("/v2/health/ready"), 503, "no model loaded")
        assert_v2_error(client.get(f"/v2/models/{MODEL}"), 503, "no model loaded")
        assert_v2_error(client.post(INFER, json=v2_body(["hi"])), 503, "no model loaded")
        assert client.get("/readyz").status_code == 503


# --- infer ------------------------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_v2_infer_gives_the_v1_labels_as_int64_and_probabilities_row_major(client):
    v1 = client.post("/v1/predict", json={"texts": REVIEWS}, headers=AUTH).json()["predictions"]
    response = client.post(INFER, json=v2_body(REVIEWS, id="req-1"), headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["model_name"], body["model_version"], body["id"]) == (MODEL, VERSION, "req-1")
    outputs = outputs_by_name(body)
    assert [o["name"] for o in body["outputs"]] == ["label", "probabilities", "label_name"]
    n = len(REVIEWS)
    assert outputs["label"]["datatype"] == "INT64" and outputs["label"]["shape"] == [n]
    assert outputs["label"]["data"] == [LABELS.index(p["label"]) for p in v1]
    assert outputs["label_name"] == {"name": "label_name", "datatype": "BYTES", "shape": [n], "data": [p["label"] for p in v1]}
    assert outputs["probabilities"]["datatype"] == "FP32" and outputs["probabilities"]["shape"] == [n, 2]
    rows = np.asarray(outputs["probabilities"]["data"]).reshape(n, 2)
    np.testing.assert_allclose(rows, [[p["probabilities"][label] for label in LABELS] for p in v1])
    assert list(rows.argmax(axis=1)) == outputs["label"]["data"]


@pytest.mark.timeout(60)
def test_v2_infer_takes_n_by_1_shapes_the_versioned_path_and_picks_outputs(client):
    texts = REVIEWS[:3]
    expected = [LABELS.index(fake_prediction(t)["label"]) for t in texts]
    body = v2_body(texts, shape=[3, 1], outputs=[{"name": "probabilities"}, {"name": "label", "parameters": {"binary_data": False}}], parameters={"binary_data_output": True})
    response = client.post(f"/v2/models/{MODEL}/versions/{VERSION}/infer", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert "id" not in answer
    assert [o["name"] for o in answer["outputs"]] == ["probabilities", "label"]
    assert answer["outputs"][1]["data"] == expected
    # a request id with a lone surrogate escape comes back as the same escape, not a 500
    echoed = client.post(INFER, content=b'{"id": "x\\ud800", "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["ok"]}]}', headers=AUTH)
    assert echoed.status_code == 200 and b'"id":"x\\ud800"' in echoed.content


BAD_V2 = [
    # (case, json body, status, words in the error)
    ("no inputs", {}, 400, "inputs: Field required"),
    ("empty inputs", {"inputs": []}, 400, "at least 1 item"),
    ("two inputs", {"inputs": v2_body(["a"])["inputs"] * 2}, 400, "at most 1 item"),
    ("not BYTES", v2_body(["a"]) | {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": ["a"]}]}, 400, "'BYTES'"),
    ("wrong input name", {"inputs": [{"name": "review", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, 400, "inputs.0.name"),
    ("shape too big", v2_body(["a"], shape=[2]), 400, "says 2 texts but data has 1"),
    ("shape [n, 2]", v2_body(["a", "b"], shape=[1, 2]), 400, "not [n] or [n, 1]"),
    ("shape of strings", v2_body(["a"], shape=["1"]), 400, "list of integers"),
    ("shape of bools", v2_body(["a"], shape=[True]), 400, "list of integers"),
    ("rank 3", v2_body(["a"], shape=[1, 1, 1]), 400, "not [n] or [n, 1]"),
    ("data not strings", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", 3]}]}, 400, "inputs.0.data.1"),
    ("nested data", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": [["a"]]}]}, 400, "valid string"),
    ("no data", {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]}, 400, "at least 1 item"),
    ("unknown output", v2_body(["a"], outputs=[{"name": "logits"}]), 400, "outputs.0.name"),
    ("empty outputs", v2_body(["a"], outputs=[]), 400, "outputs"),
    ("unknown key", v2_body(["a"], model="x"), 400, "model: Extra inputs are not permitted"),
    ("id not a string", v2_body(["a"], id=7), 400, "id: Input should be a valid string"),
    ("too many texts", v2_body(["a"] * 9), 400, "9 texts in one request; the limit is 8"),
    ("text too long", v2_body(["ok", "a" * 2001]), 400, "inputs[0].data[1] has 2001 characters; the limit is 2000"),
    ("blank text", v2_body(["ok", " \t"]), 400, "inputs[0].data[1] is empty"),
    ("lone surrogate", v2_body(["\ud800 x"]), 400, "inputs[0].data[0] has an unpaired surrogate \\ud800"),
    ("not an object", ["a"], 400, "valid dictionary"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case, body, status, words", BAD_V2, ids=[case[0] for case in BAD_V2])
def test_v2_bad_input_gets_the_protocol_error_json(client, backend, case, body, status, words):
    content = json.dumps(body).encode()  # json.dumps escapes a lone surrogate as \ud800: valid JSON text
    assert_v2_error(client.post(INFER, content=content, headers={**AUTH, "Content-Type": "application/json"}), status, words)
    assert sum(backend.rejections.values()) == 1
    assert not backend.seen, "nothing reached the model"


@pytest.mark.timeout(60)
def test_v2_gate_refuses_like_v1_with_v2_errors(client, backend):
    assert_v2_error(client.post(INFER, json=v2_body(["a"])), 401, "missing Authorization")
    assert_v2_error(client.post(INFER, content=b"{oops", headers={"Authorization": "Basic x"}), 401, "Bearer")
    assert_v2_error(client.post(INFER, content=b"{oops", headers=AUTH), 400, "not valid JSON")
    assert_v2_error(client.post(INFER, content=b"", headers=AUTH), 400, "request body is empty")
    assert_v2_error(client.post(INFER, content=b'{"a": 1', headers={**AUTH, "Content-Type": "text/plain"}), 415, "application/json")
    assert_v2_error(client.post(INFER, json=v2_body(["a" * 1000] * 70), headers=AUTH), 413, "limit is 65536")
    chunks = (b"x" * 4096 for _ in range(20))  # no Content-Length: counted as it arrives
    assert_v2_error(client.post(INFER, content=chunks, headers=AUTH), 413, "over the limit")
    assert_v2_error(client.post(INFER, content=b"{}", headers={**AUTH, "Content-Length": "9" * 40}), 413, "digits")
    assert backend.rejections["unauthorized"] == 2 and backend.rejections["body_too_large"] == 3
    assert not backend.seen


def binary_request(texts: list[str], json_extra: dict | None = None, raw: bytes | None = None) -> tuple[bytes, dict]:
    """A body in Triton's binary tensor data format, as tritonclient sends it by default
    (`raw`: these bytes as the tensor's data instead of the framed texts)."""
    if raw is None:
        raw = b"".join(struct.pack("<I", len(t.encode())) + t.encode() for t in texts)
    head = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "parameters": {"binary_data_size": len(raw)}}], **(json_extra or {})}).encode()
    return head + raw, {**AUTH, "Inference-Header-Content-Length": str(len(head))}


@pytest.mark.timeout(60)
def test_v2_binary_tensor_data_is_read_like_json(client, backend):
    body, headers = binary_request(REVIEWS, {"id": "bin"})
    binary = client.post(INFER, content=body, headers={**headers, "Content-Type": "application/octet-stream"})
    plain = client.post(INFER, json=v2_body(REVIEWS, id="bin"), headers=AUTH)
    assert binary.status_code == 200, binary.text
    assert binary.json() == plain.json()
    cases = [
        (body, {**headers, "Inference-Header-Content-Length": "x"}, "not a byte count"),
        (body, {**headers, "Inference-Header-Content-Length": str(len(body) + 1)}, "but the body has"),
        (body + b"\x00", headers, "1 bytes after the last binary input"),
        (body[:-1], headers, "does not fit"),
        (*binary_request(["a"], raw=b"\x01\x00"), "4-byte length is cut short"),
        (*binary_request(["a"], raw=struct.pack("<I", 5) + b"ab"), "says 5 bytes, 2 are left"),
        (*binary_request(["a"], raw=struct.pack("<I", 1) + b"\xff"), "element 0 is not UTF-8"),
    ]
    for content, case_headers, words in cases:
        assert_v2_error(client.post(INFER, content=content, headers=case_headers), 400, words)
    # a header that is not the JSON of a request gets the usual answers
    assert_v2_error(client.post(INFER, content=b"{nope", headers={**AUTH, "Inference-Header-Content-Length": "5"}), 400, "not valid JSON")


# --- /v1 and the schema agree -------------------------------------------------------------------

@pytest.mark.timeout(60)
def test_v1_refuses_what_its_schema_refuses(client):
    for body in ({"text": "a", "texts": None}, {"text": "a", "texts": ["b"]}, {"texts": None}, {}):
        response = client.post("/v1/predict", json=body, headers=AUTH)
        assert response.status_code == 422 and "exactly one of" in response.json()["error"]["message"], (body, response.text)
    surrogate = client.post("/v1/predict", content=b'{"texts": ["fine", "bad \\udc00"]}', headers={**AUTH, "Content-Type": "application/json"})
    assert surrogate.status_code == 422 and surrogate.json()["error"]["code"] == "invalid_text"
    assert "texts[1]" in surrogate.json()["error"]["message"]
    pair = client.post("/v1/predict", content=b'{"text": "emoji \\ud83d\\ude00"}', headers={**AUTH, "Content-Type": "application/json"})
    assert pair.status_code == 200, "a surrogate pair is one character"


@pytest.mark.timeout(60)
def test_openapi_is_exact_about_bodies_limits_and_auth(client, backend):
    spec = client.get("/openapi.json").json()
    assert "x-limits" not in json.dumps(spec)
    assert {"/v1/predict", "/v1/model", "/healthz", "/readyz", "/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/{model_name}/infer"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    predict = schemas["PredictRequest"]
    assert [branch["required"] for branch in predict["oneOf"]] == [["texts"], ["text"]]
    assert all(branch["additionalProperties"] is False for branch in predict["oneOf"])
    texts = predict["oneOf"][0]["properties"]["texts"]
    assert (texts["minItems"], texts["maxItems"], texts["items"]["maxLength"]) == (1, 8, 2000)
    assert predict["oneOf"][1]["properties"]["text"]["maxLength"] == 2000
    data = schemas["InferInputTensor"]["properties"]["data"]
    assert (data["maxItems"], data["items"]["maxLength"]) == (8, 2000)
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/predict"]["post"]["security"] == [{"apiKey": []}]
    assert spec["paths"]["/v2/models/{model_name}/infer"]["post"]["security"] == [{"apiKey": []}]
    assert "security" not in spec["paths"]["/v2/health/ready"]["get"]
    v2_errors = spec["paths"]["/v2/models/{model_name}/infer"]["post"]["responses"]["400"]
    assert v2_errors["content"]["application/json"]["schema"]["$ref"].endswith("/V2Error")
    # a reconfigured replica (new user_config) serves its new limits
    backend._limits = RequestLimits(max_texts=3, max_text_chars=50, max_body_bytes=4096)
    texts = client.get("/openapi.json").json()["components"]["schemas"]["PredictRequest"]["oneOf"][0]["properties"]["texts"]
    assert (texts["maxItems"], texts["items"]["maxLength"]) == (3, 50)


@pytest.mark.timeout(60)
def test_pattern_in_the_schema_is_the_servers_idea_of_blank():
    import re

    from serve.schemas import NON_BLANK_PATTERN

    for code in range(0x3100):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF:
            continue
        assert (re.search(NON_BLANK_PATTERN, char) is None) == (not char.strip()), hex(code)


# --- tritonclient over real HTTP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def live_server():
    """build_http_app(FakeBackend) on uvicorn in a thread; yields (url host:port, backend)."""
    import uvicorn

    backend = FakeBackend(API_KEY)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_http_app(backend), host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"127.0.0.1:{port}", backend
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def triton(live_server):
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url=live_server[0], network_timeout=30)
    yield client
    client.close()


def triton_infer(triton, texts: list[str], binary: bool, outputs: list[str] | None = None, **kwargs):
    import tritonclient.http as httpclient

    tensor = httpclient.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=binary)
    requested = [httpclient.InferRequestedOutput(name, binary_data=False) for name in outputs] if outputs else None
    # a copy: tritonclient writes Inference-Header-Content-Length into the dict it is given
    return triton.infer(MODEL, [tensor], outputs=requested, headers=dict(kwargs.pop("headers", AUTH)), **kwargs)


@pytest.mark.timeout(60)
def test_tritonclient_health_and_metadata(triton):
    assert triton.is_server_live()
    assert triton.is_server_ready()
    assert triton.is_model_ready(MODEL, headers=AUTH)
    assert triton.is_model_ready(MODEL, model_version=VERSION, headers=AUTH)
    assert not triton.is_model_ready(MODEL)  # no key
    assert not triton.is_model_ready("other", headers=AUTH)
    assert not triton.is_model_ready(MODEL, model_version="1", headers=AUTH)
    metadata = triton.get_model_metadata(MODEL, headers=AUTH)
    assert metadata["versions"] == [VERSION] and metadata["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [-1]}
    assert {o["name"]: o["datatype"] for o in metadata["outputs"]} == {"label": "INT64", "probabilities": "FP32", "label_name": "BYTES"}
    assert triton.get_server_metadata(headers=AUTH)["name"] == "imdb-platform"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("binary", [False, True], ids=["json-data", "binary-data"])
def test_tritonclient_infer_matches_v1(triton, binary):
    result = triton_infer(triton, REVIEWS, binary, request_id="r1")
    expected = [fake_prediction(text) for text in REVIEWS]
    labels = result.as_numpy("label")
    assert labels.dtype == np.int64 and labels.tolist() == [LABELS.index(p["label"]) for p in expected]
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (len(REVIEWS), 2)
    np.testing.assert_allclose(probabilities, [[p["probabilities"][label] for label in LABELS] for p in expected], rtol=1e-6)
    assert [name.decode() if isinstance(name, bytes) else name for name in result.as_numpy("label_name").tolist()] == [p["label"] for p in expected]
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (MODEL, VERSION, "r1")
    picked = triton_infer(triton, REVIEWS[:2], binary, outputs=["label"])
    assert picked.as_numpy("probabilities") is None and picked.as_numpy("label").tolist() == labels[:2].tolist()


@pytest.mark.timeout(60)
def test_tritonclient_sees_errors_with_status_and_message(triton):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    cases = [
        (lambda: triton_infer(triton, ["a"] * 9, False), "400", "limit is 8"),
        (lambda: triton_infer(triton, ["fine", "   "], True), "400", "inputs[0].data[1] is empty"),
        (lambda: triton_infer(triton, ["a"], False, headers={}), "401", "missing Authorization"),
        (lambda: triton_infer(triton, ["a"], False, model_version="9"), "404", "no version '9'"),
        (lambda: triton.get_model_metadata("other", headers=AUTH), "404", "unknown model"),
    ]
    for call, status, words in cases:
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == status and words in caught.value.message(), (status, caught.value)
    numbers = httpclient.InferInput("text", [2], "INT64")
    numbers.set_data_from_numpy(np.array([1, 2], dtype=np.int64), binary_data=False)
    with pytest.raises(InferenceServerException, match="BYTES"):
        triton.infer(MODEL, [numbers], headers=dict(AUTH))


# --- the real tokenizer and a real (tiny) model, still without Serve ----------------------------

class ModelBackend(FakeBackend):
    """The tiny random BERT behind the Backend protocol, as a replica would hold it."""

    def __init__(self, model):
        super().__init__(None)
        self.model = model

    async def predict(self, texts: list[str]) -> list[dict]:
        return self.model.predict(texts)

    def model_info(self) -> dict | None:
        return self.model.describe()


@pytest.mark.timeout(180)
def test_v2_labels_equal_v1_labels_with_the_real_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from serve.model_store import LoadedModel

    model = LoadedModel(
        name=MODEL, version="1", run_id=None,
        model=AutoModelForSequenceClassification.from_pretrained(tiny_model_dir),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir),
        max_length=64, truncation="head_tail", device=torch.device("cpu"),
    )
    texts = REVIEWS + [f"<div class='review'>Film number {i}: {'good ' * i}{'bad ' * (12 - i)}</div>" for i in range(3)]
    backend = ModelBackend(model)
    with TestClient(build_http_app(backend), raise_server_exceptions=False) as client:
        v1 = client.post("/v1/predict", json={"texts": texts}).json()["predictions"]
        v2 = client.post(INFER, json=v2_body(texts)).json()
        metadata = client.get(f"/v2/models/{MODEL}").json()
    assert metadata["versions"] == ["1"]
    outputs = outputs_by_name(v2)
    assert [model.labels[i] for i in outputs["label"]["data"]] == [p["label"] for p in v1]
    assert outputs["label_name"]["data"] == [p["label"] for p in v1]
    np.testing.assert_allclose(
        np.asarray(outputs["probabilities"]["data"]).reshape(len(texts), -1),
        [[p["probabilities"][label] for label in model.labels] for p in v1],
        atol=1e-6,
    )
