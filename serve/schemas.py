"""The HTTP contract: request and response bodies, limits, and the one shape every error has.

Two protocols share one model and one set of limits:

- `/v1`: our own JSON. Every error is `{"error": {"status", "code", "message", "details"?}}`:
  a client (or a person reading logs) learns what was wrong without reading server code.
- `/v2`: the Open Inference Protocol (KServe v2 / Triton HTTP). Errors are the protocol's
  `{"error": "<message>"}`; a text goes in as one element of a BYTES tensor named `text`.

The OpenAPI schema says exactly what the server accepts: request models forbid unknown
keys, `PredictRequest` is a oneOf, and the limits of the replica (max texts, max
characters) are filled into the schema when it is served (`apply_limits`), since
`user_config` can change them on a live deployment.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator, model_validator

EXAMPLE_TEXTS = ["A moving story with wonderful acting.", "Dull, predictable and far too long."]

# Exactly the characters str.isspace() (and so str.strip()) treats as whitespace, as one
# class that ECMA-262 and Python regexes read alike (their `\s` differ: U+FEFF, U+001C-1F).
WHITESPACE_CLASS = "\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
NON_BLANK_PATTERN = f"[^{WHITESPACE_CLASS}]"  # unanchored: somewhere a character that is not whitespace
# A code point U+D800-U+DFFF in a Python str is a lone surrogate: `"\ud800"` is valid JSON
# syntax, but not a Unicode character, and the Rust tokenizer raises on it (a 500, and the
# whole batch of other requests with it) - so texts are checked for them at the door.
LONE_SURROGATE = re.compile("[\ud800-\udfff]")
LIMIT_MARK = "x-limits"  # {schema keyword: RequestLimits field}, resolved by apply_limits


def _text_schema(description: str) -> dict:
    """One text, as the server checks it (maxLength comes from the limits when served)."""
    return {
        "type": "string",
        "minLength": 1,
        "pattern": NON_BLANK_PATTERN,
        "description": f"{description}; not only whitespace; Unicode characters only (no unpaired surrogate escapes)",
        LIMIT_MARK: {"maxLength": "max_text_chars"},
    }


# --- /v1 ---------------------------------------------------------------------------------

def _predict_request_schema(schema: dict[str, Any], cls: type) -> None:
    """A oneOf of {texts} and {text}, each closed to other keys: what _one_of accepts."""
    schema.clear()
    schema.update(
        {
            "title": "PredictRequest",
            "description": 'Either `texts` (a list) or `text` (one string), not both, and no other key.',
            "oneOf": [
                {
                    "title": "Texts",
                    "type": "object",
                    "properties": {
                        "texts": {
                            "type": "array",
                            "items": _text_schema("a text to classify"),
                            "minItems": 1,
                            "description": "texts to classify, in order",
                            LIMIT_MARK: {"maxItems": "max_texts"},
                        }
                    },
                    "required": ["texts"],
                    "additionalProperties": False,
                },
                {
                    "title": "Text",
                    "type": "object",
                    "properties": {"text": _text_schema("a single text to classify")},
                    "required": ["text"],
                    "additionalProperties": False,
                },
            ],
            "examples": [{"texts": EXAMPLE_TEXTS}, {"text": EXAMPLE_TEXTS[0]}],
        }
    )


class PredictRequest(BaseModel):
    """Either `texts` (a list) or `text` (one string), not both."""

    model_config = ConfigDict(
        extra="forbid",  # a typo such as "txt" must fail loudly, not predict nothing
        json_schema_extra=_predict_request_schema,
    )

    texts: list[StrictStr] | None = Field(None, description="texts to classify, in order", min_length=1)
    text: StrictStr | None = Field(None, description="a single text to classify")

    @model_validator(mode="after")
    def _one_of(self) -> "PredictRequest":
        # keys, not values: {"text": "a", "texts": null} is two keys, as the schema's oneOf says
        given = [name for name in ("texts", "text") if name in self.model_fields_set]
        if len(given) != 1 or getattr(self, given[0]) is None:
            raise ValueError('give exactly one of "texts" (a list of strings) or "text" (a string)')
        return self

    def all_texts(self) -> list[str]:
        return self.texts if self.texts is not None else [self.text]  # type: ignore[list-item]


class Prediction(BaseModel):
    label: str = Field(description="the most probable class")
    score: float = Field(description="probability of `label`")
    probabilities: dict[str, float] = Field(description="probability of every class")
    model_name: str = Field(description="registered model that answered")
    model_version: str = Field(description="registered version that answered")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class ModelInfo(BaseModel):
    name: str
    version: str
    run_id: str | None
    aliases: list[str]
    uri: str
    labels: list[str]
    max_length: int
    truncation: str
    backend: str = Field("torch", description="the inference backend this replica runs: torch, onnx or onnx-int8")
    test_metrics: dict[str, float]
    device: str
    loaded_at: float
    selector: str = Field(description="what the replica follows: models:/<name>@<alias> or models:/<name>/<version>")
    last_error: str | None = Field(None, description="why the last switch to another version failed (the model above still serves)")


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class RequestError(Exception):
    """A client error the handlers turn into a JSON 4xx."""

    def __init__(self, status: int, code: str, message: str, details: list[dict[str, Any]] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.details = status, code, message, details


def error_payload(status: int, code: str, message: str, details: list[dict[str, Any]] | None = None) -> dict:
    body: dict[str, Any] = {"status": status, "code": code, "message": message}
    if details:
        body["details"] = details
    return {"error": body}


@dataclass(frozen=True)
class RequestLimits:
    max_texts: int
    max_text_chars: int
    max_body_bytes: int

    def check(self, texts: list[str], field: str = "texts") -> None:
        """Raise RequestError (422) naming the first text that breaks a limit.

        `field` names the texts in messages: "text" (one string), else a list such as
        "texts" or "inputs[0].data", whose items are named `field[i]`.
        """
        if len(texts) > self.max_texts:
            raise RequestError(422, "too_many_texts", f"{len(texts)} texts in one request; the limit is {self.max_texts}")
        for index, text in enumerate(texts):
            where = field if field == "text" else f"{field}[{index}]"
            surrogate = LONE_SURROGATE.search(text)
            if surrogate:
                raise RequestError(
                    422,
                    "invalid_text",
                    f"{where} has an unpaired surrogate \\u{ord(surrogate.group()):04x} at character {surrogate.start()}: "
                    "not a Unicode character (send the text as UTF-8, or escape astral characters as a surrogate pair)",
                )
            if not text.strip():
                raise RequestError(422, "empty_text", f"{where} is empty (or only whitespace): nothing to classify")
            if len(text) > self.max_text_chars:
                raise RequestError(
                    422, "text_too_long", f"{where} has {len(text)} characters; the limit is {self.max_text_chars}"
                )


def apply_limits(openapi: dict, limits: RequestLimits) -> dict:
    """A copy of `openapi` with every `x-limits` mark replaced by the limit's value."""

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            marks = node.get(LIMIT_MARK) or {}
            resolved = {key: resolve(value) for key, value in node.items() if key != LIMIT_MARK}
            resolved.update({keyword: getattr(limits, name) for keyword, name in marks.items()})
            return resolved
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    return resolve(openapi)  # new dicts and lists all the way down: `openapi` stays as it was


# --- /v2: the Open Inference Protocol ------------------------------------------------------

V2_INPUT = "text"
LABEL_OUTPUT, PROBABILITIES_OUTPUT, LABEL_NAME_OUTPUT = "label", "probabilities", "label_name"
V2_OUTPUTS = (LABEL_OUTPUT, PROBABILITIES_OUTPUT, LABEL_NAME_OUTPUT)
# the platform names of Triton's model configuration, by the backend the replica runs
V2_PLATFORMS = {"torch": "pytorch_libtorch", "onnx": "onnxruntime_onnx", "onnx-int8": "onnxruntime_onnx"}
V2_PLATFORM = V2_PLATFORMS["torch"]
BINARY_HEADER = "inference-header-content-length"  # Triton's binary tensor data extension


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: any size")


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] = Field(description="the version this replica serves")
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, str] = Field(description="what runs it: `backend` (torch, onnx, onnx-int8) and `device` (cpu, cuda)")


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ServerLive(BaseModel):
    live: bool


class ServerReady(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class V2Error(BaseModel):
    """The Open Inference Protocol's error body."""

    error: str


class InferInputTensor(BaseModel):
    """The texts, as a BYTES tensor of shape [n] or [n, 1], data flat in row-major order."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["text"] = Field(description="the model's one input")
    datatype: Literal["BYTES"] = Field(description="texts are BYTES (UTF-8 strings in JSON)")
    shape: list[int] = Field(
        description="[n] or [n, 1]: n texts",
        json_schema_extra={
            "prefixItems": [{"type": "integer", "minimum": 1, LIMIT_MARK: {"maximum": "max_texts"}}, {"const": 1}],
            "items": False,
            "minItems": 1,
            "maxItems": 2,
        },
    )
    data: list[StrictStr] = Field(
        description="the n texts, flat",
        min_length=1,
        json_schema_extra={"items": _text_schema("a text to classify"), LIMIT_MARK: {"maxItems": "max_texts"}},
    )
    parameters: dict[str, Any] | None = Field(None, description="accepted and ignored")

    @field_validator("shape", mode="before")
    @classmethod
    def _integers(cls, shape: Any) -> Any:
        # JSON Schema's "integer": 2 and 2.0, not "2" or true (pydantic's lax int takes those)
        if isinstance(shape, list):
            for dim in shape:
                if isinstance(dim, bool) or not (isinstance(dim, int) or (isinstance(dim, float) and dim.is_integer())):
                    raise ValueError(f"shape must be a list of integers, got {json.dumps(shape, default=repr)[:80]}")
        return shape

    @model_validator(mode="after")
    def _shape_fits_data(self) -> "InferInputTensor":
        if len(self.shape) not in (1, 2) or (len(self.shape) == 2 and self.shape[1] != 1) or self.shape[0] < 1:
            raise ValueError(f"shape {self.shape} is not [n] or [n, 1] with n >= 1")
        if self.shape[0] != len(self.data):
            raise ValueError(f"shape {self.shape} says {self.shape[0]} texts but data has {len(self.data)}")
        return self


class InferRequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Literal["label", "probabilities", "label_name"] = Field(description="an output of the model")
    parameters: dict[str, Any] | None = Field(None, description="accepted and ignored (outputs are always JSON)")


class InferenceRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": EXAMPLE_TEXTS}],
                    "outputs": [{"name": "label"}, {"name": "probabilities"}],
                }
            ]
        },
    )

    id: StrictStr | None = Field(None, description="echoed in the response")
    parameters: dict[str, Any] | None = Field(None, description="accepted and ignored (binary_data_output included: outputs are JSON)")
    inputs: list[InferInputTensor] = Field(description="exactly one tensor, named text", min_length=1, max_length=1)
    outputs: list[InferRequestedOutput] | None = Field(None, description="outputs to return, in this order (default: all)", min_length=1)

    def texts(self) -> list[str]:
        return list(self.inputs[0].data)

    def output_names(self) -> list[str]:
        if self.outputs is None:
            return list(V2_OUTPUTS)
        return list(dict.fromkeys(output.name for output in self.outputs))  # once each, in the order asked


class InferOutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[int | float | str]


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutputTensor]


def model_metadata(info: dict) -> dict:
    """GET /v2/models/{name}: what the served version takes and gives."""
    labels = class_names(info)
    return {
        "name": info["name"],
        "versions": [str(info["version"])],
        "platform": V2_PLATFORMS.get(info.get("backend", "torch"), V2_PLATFORM),
        "inputs": [{"name": V2_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": LABEL_OUTPUT, "datatype": "INT64", "shape": [-1]},
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, len(labels)]},
            {"name": LABEL_NAME_OUTPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "parameters": {"backend": str(info.get("backend", "torch")), "device": str(info.get("device", "cpu"))},
    }


def class_names(info: dict) -> list[str]:
    """Class order of the model (index = the INT64 label): negative=0, positive=1 for IMDB."""
    return [str(label) for label in info.get("labels") or ("negative", "positive")]


def infer_outputs(predictions: list[dict], labels: list[str], wanted: list[str]) -> list[dict]:
    """/v1 predictions (one per text) -> the v2 output tensors asked for, in that order."""
    n = len(predictions)
    tensors = {
        LABEL_OUTPUT: {"datatype": "INT64", "shape": [n], "data": [labels.index(p["label"]) for p in predictions]},
        PROBABILITIES_OUTPUT: {
            "datatype": "FP32",
            "shape": [n, len(labels)],
            "data": [p["probabilities"][label] for p in predictions for label in labels],  # row-major
        },
        LABEL_NAME_OUTPUT: {"datatype": "BYTES", "shape": [n], "data": [p["label"] for p in predictions]},
    }
    return [{"name": name, **tensors[name]} for name in wanted]


def binary_request_to_json(body: bytes, header_length: str) -> bytes:
    """Triton's binary tensor data extension -> the same request in plain JSON.

    The body is a JSON header of `header_length` bytes, then each input that has
    `parameters.binary_data_size` as that many raw bytes, in input order; a BYTES
    element is a 4-byte little-endian length and that many UTF-8 bytes. Raises
    RequestError (400) when the framing is wrong; a header that is not a JSON object
    is passed on as it is, for the usual JSON errors.
    """
    if not header_length.strip().isascii() or not header_length.strip().isdigit():
        raise RequestError(400, "bad_binary_header", f"Inference-Header-Content-Length {header_length!r} is not a byte count")
    size = int(header_length.strip())
    if size > len(body):
        raise RequestError(400, "bad_binary_header", f"Inference-Header-Content-Length is {size} but the body has {len(body)} bytes")
    head, rest = body[:size], memoryview(body)[size:]
    try:
        request = json.loads(head)
    except (ValueError, RecursionError):
        return head  # not JSON: FastAPI answers it as any broken JSON body
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        return head
    offset = 0
    for index, tensor in enumerate(request["inputs"]):
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
            continue
        nbytes = parameters.pop("binary_data_size")
        if not parameters:
            del tensor["parameters"]
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 <= nbytes <= len(rest) - offset:
            raise RequestError(400, "bad_binary_data", f"inputs[{index}]: binary_data_size {nbytes!r} does not fit the {len(rest) - offset} bytes left")
        if tensor.get("datatype") != "BYTES":
            raise RequestError(400, "bad_binary_data", f"inputs[{index}]: binary data is accepted for BYTES inputs only")
        tensor["data"] = _bytes_elements(rest[offset : offset + nbytes], index)
        offset += nbytes
    if offset != len(rest):
        raise RequestError(400, "bad_binary_data", f"{len(rest) - offset} bytes after the last binary input")
    return json.dumps(request).encode("utf-8")


def _bytes_elements(raw: memoryview, index: int) -> list[str]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise RequestError(400, "bad_binary_data", f"inputs[{index}]: a BYTES element's 4-byte length is cut short")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise RequestError(400, "bad_binary_data", f"inputs[{index}]: element {len(elements)} says {length} bytes, {len(raw) - offset} are left")
        try:
            elements.append(bytes(raw[offset : offset + length]).decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise RequestError(400, "bad_binary_data", f"inputs[{index}]: element {len(elements)} is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
        offset += length
    return elements
