"""Bad input at the door of the endpoint: /v1 and /v2 under generated requests.

Every request gets an answer below 500; every 4xx carries the documented error JSON
of its protocol (`/v1`: `{"error": {"status", "code", "message"}}`, `/v2`:
`{"error": "<message>"}`); every 200 has one prediction (or one label) per text sent;
and the OpenAPI schema the app serves says exactly what it accepts.

- schemathesis generates requests from the app's own `/openapi.json` (valid ones, and
  for the two POSTs invalid ones too) and checks the answers against the schema;
- hypothesis throws what no schema describes: arbitrary JSON values and bytes, odd
  unicode (lone surrogate escapes, NUL, RTL marks, emoji, combining marks, very long
  strings), NaN and 5000-digit numbers, deep nesting, wrong Content-Types, wrong or
  missing keys, lying Content-Lengths, bodies in chunks, Triton binary framing;
- a property test compares the schema's verdict (jsonschema) with the server's.

Requests go straight into the ASGI app (no sockets, no threads) over FakeBackend
(tests/test_serve_protocol.py), whose predict is cheap and as strict about text as
the Rust tokenizer: a text that would crash the model crashes it too, as a 500.
The examples are derandomized (the same on every run, so CI is not flaky); set
SERVE_FUZZ_EXAMPLES=2000 SERVE_FUZZ_RANDOM=1 to explore further by hand.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from serve.http_api import build_http_app
from serve.schemas import RequestLimits
from tests.test_serve_protocol import API_KEY, AUTH, INFER, LIMITS, MODEL, VERSION, FakeBackend

EXAMPLES = int(os.environ.get("SERVE_FUZZ_EXAMPLES", "0")) or None
FUZZ = settings(
    deadline=None,
    database=None,  # nothing written into the repository
    derandomize=not os.environ.get("SERVE_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=EXAMPLES or max_examples)


PREDICT = "/v1/predict"
INFER_VERSION = f"/v2/models/{MODEL}/versions/{VERSION}/infer"


@pytest.fixture(scope="module")
def backend() -> FakeBackend:
    return FakeBackend(API_KEY)


@pytest.fixture(scope="module")
def app(backend):
    return build_http_app(backend)


# --- the ASGI call and what every answer must look like -----------------------------------------

def call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, dict, bytes]:
    """One request straight into the ASGI app: (status, headers, body); an escaped exception is a 500."""
    messages = [{"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1} for i, chunk in enumerate(chunks or [b""])]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
    }

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception:  # Starlette re-raises after its 500 answer
            pass

    asyncio.run(run())
    start = next((m for m in sent if m["type"] == "http.response.start"), None)
    if start is None:
        return 500, {}, b"no response"
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in start.get("headers", [])}, body


def is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def check_answer(path: str, status: int, body: bytes, texts_sent: int | None = None) -> dict:
    """The documented contract of any answer; returns the parsed JSON."""
    assert status < 500, (status, body[:300])
    document = json.loads(body)  # every answer is JSON, and strict-JSON decodable
    if status >= 400:
        if is_v2(path):
            assert list(document) == ["error"] and isinstance(document["error"], str) and document["error"], document
        else:
            error = document["error"]
            assert error["status"] == status and isinstance(error["code"], str) and isinstance(error["message"], str), document
            assert set(error) <= {"status", "code", "message", "details"}, document
    elif status == 200 and texts_sent is not None:
        if is_v2(path):
            labels = next(o for o in document["outputs"] if o["name"] == "label")
            assert labels["shape"] == [texts_sent] and len(labels["data"]) == texts_sent
        else:
            assert len(document["predictions"]) == texts_sent
    return document


# --- schemathesis, from the app's own schema ----------------------------------------------------

@pytest.fixture(scope="module")
def openapi(app):
    import schemathesis

    return schemathesis.openapi.from_asgi("/openapi.json", app)


OPERATIONS = [
    # (method, path, path parameters fixed to the served model (or None: generated), examples)
    ("POST", "/v1/predict", None, 150),
    ("POST", "/v2/models/{model_name}/infer", {"model_name": MODEL}, 150),
    ("POST", "/v2/models/{model_name}/versions/{model_version}/infer", {"model_name": MODEL, "model_version": VERSION}, 60),
    ("POST", "/v2/models/{model_name}/infer", None, 20),
    ("GET", "/v1/model", None, 5),
    ("GET", "/healthz", None, 5),
    ("GET", "/readyz", None, 5),
    ("GET", "/v2", None, 5),
    ("GET", "/v2/health/live", None, 5),
    ("GET", "/v2/health/ready", None, 5),
    ("GET", "/v2/models/{model_name}", None, 20),
    ("GET", "/v2/models/{model_name}", {"model_name": MODEL}, 5),
    ("GET", "/v2/models/{model_name}/ready", None, 20),
    ("GET", "/v2/models/{model_name}/versions/{model_version}", None, 20),
    ("GET", "/v2/models/{model_name}/versions/{model_version}", {"model_name": MODEL, "model_version": VERSION}, 5),
    ("GET", "/v2/models/{model_name}/versions/{model_version}/ready", None, 20),
]
# the checks that hold for this API; left out: use_after_free, ensure_resource_availability and
# object_level_authorization (no resources are created), ignored_auth (tested below directly)
SCHEMATHESIS_CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "positive_data_acceptance",
    "missing_required_header",
]


@pytest.mark.timeout(60)
def test_every_operation_of_the_schema_is_fuzzed(openapi):
    served = {(op.ok().method.upper(), op.ok().path) for op in openapi.get_all_operations()}
    assert served == {(method, path) for method, path, _, _ in OPERATIONS}


def _run_schemathesis(openapi, method: str, path: str, path_parameters: dict | None, mode: str, examples: int) -> None:
    from schemathesis import GenerationMode
    from schemathesis.checks import CHECKS, load_all_checks

    load_all_checks()
    checks = CHECKS.get_by_names(SCHEMATHESIS_CHECKS)
    if mode == "positive" and path_parameters is None and "{" in path:
        checks = [check for check in checks if check.__name__ != "positive_data_acceptance"]  # another model's name is a 404
    operation = openapi[path][method]
    strategy = operation.as_strategy(generation_mode=GenerationMode(mode), headers=dict(AUTH), path_parameters=path_parameters)

    @fuzz(examples)
    @given(case=strategy)
    def run(case) -> None:
        if mode == "positive" and path.endswith("/infer"):
            # the one rule JSON Schema cannot say: shape[0] == len(data) (tested in test_serve_protocol)
            tensor = case.body["inputs"][0]
            tensor["shape"][0] = len(tensor["data"])
        response = case.call()
        event(f"status {response.status_code}")
        case.validate_response(response, checks=checks, headers=dict(AUTH))
        check_answer(path, response.status_code, response.content)

    run()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method, path, path_parameters, examples", OPERATIONS, ids=[f"{m} {p}{' (served model)' if f else ''}" for m, p, f, _ in OPERATIONS])
def test_schemathesis_valid_requests(openapi, method, path, path_parameters, examples):
    _run_schemathesis(openapi, method, path, path_parameters, "positive", examples)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("path, path_parameters", [(p, f) for m, p, f, _ in OPERATIONS if m == "POST" and (f or "{" not in p)])
def test_schemathesis_invalid_bodies(openapi, path, path_parameters):
    _run_schemathesis(openapi, "POST", path, path_parameters, "negative", 150)


@pytest.mark.timeout(60)
def test_operations_the_schema_secures_refuse_a_missing_key_and_no_others(app, openapi):
    document = openapi.raw_schema
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            concrete = path.replace("{model_name}", MODEL).replace("{model_version}", VERSION)
            for headers in ([], [(b"authorization", b"Bearer not-the-key")]):
                status, _, body = call(app, method.upper(), concrete, headers, [b"{}"] if method == "post" else [])
                check_answer(concrete, status, body)
                assert (status == 401) == ("security" in operation), (method, path, status)


# --- hypothesis: what no schema describes --------------------------------------------------------

ODD_PIECES = [
    "\x00", "\u200e", "\u200f", "\u202e", "\u2066", "\u0301", "e" + "\u0301" * 40, "😀", "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\ufeff", "\u2028", "\x85", "\xa0", "\u3000", "\u200b", "\uffff", "\U0010ffff", "\x1b[31m", "\r\n", "\t", "\\", '"', "'",
    "<br />", "<script>alert(1)</script>", "&amp;", "&#0;", "&#xD800;", "זה סרט", "فيلم رائع", "映画", "Ω≈ç√", " ",
    "\ud800", "\udfff", "\udbff", "\udc00",  # lone surrogates: JSON text can carry them as \ud800 escapes
]
LONG_TEXTS = ["a" * 2000, "a" * 2001, "word " * 400, "é" * 2001, "😀" * 2000, "😀" * 2001, " " * 3000, "x" * 70_000]
odd_texts = st.one_of(
    st.lists(st.one_of(st.sampled_from(ODD_PIECES), st.text(max_size=8)), max_size=8).map("".join),
    st.text(st.characters(codec=None, categories=None), max_size=30),  # any code point, surrogates included
    st.sampled_from(LONG_TEXTS),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**63) | st.floats() | odd_texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(odd_texts | st.sampled_from(["text", "texts", "inputs", "data"]), children, max_size=4),
    max_leaves=12,
)
RAW_BODIES = [
    b'{"text": NaN}', b'{"texts": [Infinity]}', b'{"text": -Infinity}', b'{"text": 1' + b"9" * 5000 + b"}",
    b"[" * 30_000 + b"]" * 30_000, b'{"text": "' + b"\\ud800" * 10 + b'"}', b'{"text": "a\\u0000b"}', b'{"text": "\\x41"}',
    b'\xef\xbb\xbf{"text": "BOM first"}', '{"text": "utf-16"}'.encode("utf-16"), b'{"text": "a"} trailing', b'{"text": "a", "text": "b"}',
    b'{"text": "\xed\xa0\x80"}',  # a surrogate in CESU-8: not UTF-8
    b'{"texts": ["a"], "texts": 3}', b"", b" ", b"null", b"0", b'"text"', b"{}", b"[]", b"{" * 5000,
]


def v2_request(texts: list[str], shape: list, datatype: str = "BYTES", name: str = "text", **extra) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape, "data": texts}], **extra}


def usually(draw, good, bad: list):
    """`good` about four times in five, else one of `bad`: most requests get far enough to test the next check.
    (3 of 0..4: hypothesis draws the bounds, 0 above all, more often than the others.)"""
    return draw(st.sampled_from(bad)) if draw(st.integers(0, 4)) == 3 else good


fair_texts = st.text(st.characters(codec="utf-8"), min_size=1, max_size=40).filter(str.strip)  # any Unicode character


@st.composite
def text_lists(draw) -> list[str]:
    """Mostly texts the server takes; one time in three one odd text among them."""
    texts = draw(st.lists(fair_texts, min_size=1, max_size=9))
    if not draw(st.integers(0, 2)):
        texts.insert(draw(st.integers(0, len(texts))), draw(odd_texts))
    return texts


@st.composite
def json_bodies(draw, path: str) -> object:
    """Near-valid bodies of the path's protocol (most reach the limits and the model), or any JSON value."""
    texts = draw(text_lists())
    protocol = "v1" if path == PREDICT else "v2" if path.endswith("/infer") else "any"
    kind = usually(draw, protocol, ["v1", "v2", "v2 odd", "any"]) if protocol != "any" else "any"
    if kind == "v1":
        if draw(st.booleans()):
            return {"text": texts[0]}
        return {"texts": texts, **usually(draw, {}, [{"text": "x"}, {"txt": 1}, {"texts": None}, {"text": None}])}
    if kind == "v2":
        n = len(texts)
        shape = usually(draw, draw(st.sampled_from([[n], [n, 1]])), [[n + 1], [max(n - 1, 0)], [n, 2], [-1], [n, 1, 1], [], [str(n)], [float(n)], [True], [2**70]])
        extra = usually(draw, {}, [{"id": "x"}, {"id": draw(odd_texts)}, {"outputs": [{"name": "label"}]}, {"outputs": [{"name": "logits"}]}, {"parameters": {"binary_data_output": True}}, {"inputs2": 1}])
        return v2_request(texts, shape, **extra)
    if kind == "v2 odd":
        return v2_request(draw(json_values), draw(json_values), draw(st.sampled_from(["BYTES", "FP32", "bytes", ""])), draw(st.sampled_from(["text", "TEXT", "input"])))
    return draw(json_values)


@st.composite
def bodies(draw, path: str) -> bytes:
    kind = usually(draw, "json", ["raw", "bytes", "triton binary"] if path.endswith("/infer") else ["raw", "bytes"])
    if kind == "raw":
        return draw(st.sampled_from(RAW_BODIES))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "triton binary":  # framed by hand, lengths sometimes lying
        texts = draw(text_lists())
        raw = b"".join(struct.pack("<I", len(t.encode("utf-8", "surrogatepass"))) + t.encode("utf-8", "surrogatepass") for t in texts)
        raw = usually(draw, raw, [raw[:-1], raw + b"\x00", b"\xff\xff\xff\xff" + raw])
        size = usually(draw, len(raw), [len(raw) + 1, 0, 2**40, -1, "12"])
        datatype = usually(draw, "BYTES", ["INT64", "FP32"])
        head = json.dumps({"inputs": [{"name": "text", "datatype": datatype, "shape": [len(texts)], "parameters": {"binary_data_size": size}}]}).encode()
        return b"BINARY" + struct.pack("<I", len(head)) + head + raw  # the header length travels in a header: see requests()
    value = draw(json_bodies(path))
    ascii_only = draw(st.booleans())
    try:
        text = json.dumps(value, ensure_ascii=ascii_only)  # NaN and Infinity come out as bare tokens
    except ValueError:  # an int too long to print
        text = '{"text": 1' + "0" * 5000 + "}"
    return text.encode("utf-8", "surrogatepass")  # ensure_ascii=False: a lone surrogate as invalid UTF-8 bytes


AUTH_HEADERS = [
    [(b"authorization", f"Bearer {API_KEY}".encode())],
    [(b"authorization", f"bearer   {API_KEY}  ".encode())],
    [],
    [(b"authorization", b"Bearer wrong")],
    [(b"authorization", b"Basic dXNlcjpwYXNz")],
    [(b"authorization", b"Bearer")],
    [(b"authorization", b"Bearer " + "ключ\xff".encode("utf-8") + b"\xfe")],
    [(b"authorization", b"Bearer " + b"k" * 10_000)],
    [(b"authorization", f"Bearer {API_KEY}".encode()), (b"authorization", b"Bearer wrong")],
]
CONTENT_TYPES = [
    None, b"application/json", b"application/json; charset=utf-8", b"APPLICATION/JSON", b"application/merge-patch+json", b"text/plain",
    b"application/x-www-form-urlencoded", b"multipart/form-data; boundary=x", b"application/octet-stream", b"", b"\xff\xfe", b";;;",
]
PATHS = [PREDICT, PREDICT, PREDICT, INFER, INFER, INFER, INFER_VERSION, "/v2/models/other/infer", f"/v2/models/{MODEL}/versions/0/infer", "/v1/model", "/v2", f"/v2/models/{MODEL}", "/v2/health/ready", "/v1/nope", "/v2/models/\u202e\U0001f600/infer", "/healthz"]


@st.composite
def requests(draw) -> tuple[str, str, list, list[bytes]]:
    path = draw(st.sampled_from(PATHS))
    method = usually(draw, "POST", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
    body = draw(bodies(path))
    headers = list(usually(draw, AUTH_HEADERS[0], AUTH_HEADERS[1:]))
    if body.startswith(b"BINARY"):
        (head_size,) = struct.unpack_from("<I", body, 6)
        body = body[10:]
        length = usually(draw, str(head_size).encode(), [str(head_size + 3).encode(), b"-1", b"x", b"9" * 30, b"\xb2"])
        headers.append((b"inference-header-content-length", length))
    content_type = usually(draw, b"application/json", CONTENT_TYPES)
    if content_type is not None:
        headers.append((b"content-type", content_type))
    declared = usually(draw, "true", ["none", "less", "more", "huge", "digits", "junk", "superscript", "negative"])
    length = {"true": str(len(body)).encode(), "less": str(max(len(body) - 1, 0)).encode(), "more": str(len(body) + 10).encode(), "huge": b"99999999999",
              "digits": b"9" * 5000, "junk": b"12abc", "superscript": "\xb2".encode("latin-1"), "negative": b"-5"}.get(declared)
    if length is not None:
        headers.append((b"content-length", length))
    cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=3)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])]
    return path, method, headers, chunks


def texts_in(path: str, body: bytes, headers: list) -> int | None:
    """How many texts a request carries (None: not a readable prediction request)."""
    if any(name == b"inference-header-content-length" for name, _ in headers):
        return None
    try:
        document = json.loads(body)
        if path == PREDICT:
            return len(document["texts"]) if "texts" in document else 1
        return len(document["inputs"][0]["data"])
    except Exception:
        return None


@pytest.mark.timeout(120)
def test_generated_requests_never_get_a_5xx_and_errors_are_documented(app, backend):
    seen_before = len(backend.seen)

    @fuzz(400)
    @given(request=requests())
    def run(request) -> None:
        path, method, headers, chunks = request
        status, _, body = call(app, method, path, headers, chunks)
        event(f"{path.split('/')[1]} {status}")
        if method == "HEAD":
            assert status < 500
            return
        check_answer(path, status, body, texts_in(path, b"".join(chunks), headers) if method == "POST" else None)

    run()
    assert len(backend.seen) > seen_before, "no generated request reached the model: the generator is too far off"
    assert all(isinstance(text, str) and text.strip() for text in backend.seen)


# --- the schema's verdict is the server's -----------------------------------------------------

def schema_validator(document: dict, component: str):
    from jsonschema import Draft202012Validator

    return Draft202012Validator({"$ref": f"#/components/schemas/{component}", "components": document["components"]})


plain_texts = st.one_of(  # no lone surrogates: a JSON Schema cannot forbid them (tested apart)
    st.text(max_size=12),
    st.sampled_from([" ", "\t\n", "\u3000", "\ufeff", "\x1c", "\u200b", "\x85", "a" * 1999, "a" * 2000, "a" * 2001, "😀" * 2000]),
)


@st.composite
def v1_candidates(draw) -> dict:
    value_of = st.one_of(plain_texts, st.lists(plain_texts, max_size=10), st.none(), st.integers(), st.lists(st.integers(), max_size=2))
    keys = draw(st.lists(st.sampled_from(["text", "texts", "txt"]), max_size=3, unique=True))
    return {key: draw(value_of) for key in keys}


@st.composite
def v2_candidates(draw) -> dict:
    texts = draw(st.one_of(st.lists(plain_texts, max_size=10), st.lists(st.one_of(plain_texts, st.integers()), max_size=3)))
    n = len(texts)
    shape = draw(st.sampled_from([[n], [n, 1], [float(n)], [n, 1.0], [n + 1], [n, 2], [], [n, 1, 1], ["1"], [True], [-1], [0]]))
    tensor = {"name": draw(st.sampled_from(["text", "text", "text", "texts"])), "datatype": draw(st.sampled_from(["BYTES", "BYTES", "FP32"])), "shape": shape, "data": texts}
    if draw(st.booleans()):
        tensor["parameters"] = draw(st.sampled_from([{}, {"x": 1}, None, "p"]))
    body: dict = {"inputs": draw(st.sampled_from([[tensor], [tensor], [tensor, tensor], []]))}
    for key, values in (("id", ["r", None, 1]), ("outputs", [None, [], [{"name": "label"}], [{"name": "label_name"}, {"name": "probabilities"}], [{"name": "nope"}], [{"name": "label", "x": 1}]]), ("parameters", [{}, {"binary_data_output": True}, None, []]), ("other", [1])):
        if draw(st.integers(0, 3)) == 0:
            body[key] = draw(st.sampled_from(values))
    return body


def schema_verdict_and_answer(app, path: str, validator, body) -> tuple[bool, int | None, bytes]:
    """(the schema's verdict, the status, the answer) of an authorized POST of `body`;
    status None for a body over the transport's limit, which must have been a 413."""
    valid = validator.is_valid(body)
    raw = json.dumps(body, ensure_ascii=False).encode()
    status, _, answer = call(app, "POST", path, [(b"authorization", f"Bearer {API_KEY}".encode())], [raw])
    event(f"schema {'valid' if valid else 'invalid'}, {status}")
    if len(raw) > LIMITS.max_body_bytes:  # the transport's limit, not the schema's
        assert status == 413
        return valid, None, answer
    return valid, status, answer


@pytest.mark.timeout(120)
def test_v1_accepts_exactly_what_its_schema_accepts(app, openapi):
    validator = schema_validator(openapi.raw_schema, "PredictRequest")

    @fuzz(300)
    @given(body=v1_candidates())
    def run(body) -> None:
        valid, status, answer = schema_verdict_and_answer(app, PREDICT, validator, body)
        if status is None:
            return  # over the body limit: 413, checked there
        assert (status == 200) == valid, (body, status, answer[:300])
        assert status in (200, 422), (status, answer[:300])

    run()


@pytest.mark.timeout(120)
def test_v2_accepts_what_its_schema_accepts_but_a_shape_that_does_not_fit_the_data(app, openapi):
    validator = schema_validator(openapi.raw_schema, "InferenceRequest")

    @fuzz(300)
    @given(body=v2_candidates())
    def run(body) -> None:
        valid, status, answer = schema_verdict_and_answer(app, INFER, validator, body)
        if status is None:
            return  # over the body limit: 413, checked there
        assert status in (200, 400), (status, answer[:300])
        if not valid:
            assert status == 400, (body, answer[:300])
        elif status != 200:  # JSON Schema cannot say shape[0] == len(data)
            assert "says" in json.loads(answer)["error"], (body, answer[:300])

    run()


@pytest.mark.timeout(60)
def test_limits_in_the_schema_follow_a_reconfigured_replica():
    backend = FakeBackend(limits=RequestLimits(max_texts=2, max_text_chars=5, max_body_bytes=1024))
    app = build_http_app(backend)
    status, _, body = call(app, "GET", "/openapi.json", [], [])
    validator = schema_validator(json.loads(body), "PredictRequest")
    for texts, accepted in ((["12345", "ok"], True), (["123456"], False), (["a", "b", "c"], False)):
        assert validator.is_valid({"texts": texts}) == accepted
        assert (call(app, "POST", PREDICT, [], [json.dumps({"texts": texts}).encode()])[0] == 200) == accepted
