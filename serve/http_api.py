"""The FastAPI app a replica serves: routes, the request gate (auth, size, type), and JSON errors.

`build_http_app(backend)` is called once per replica (Serve's late-bound ingress,
`__serve_build_asgi_app__`), so the routes close over that replica's backend and
nothing but the request itself is built per request. It needs no Serve: tests can
mount it on any ASGI server.

Two protocols over the same backend and the same RequestLimits:
- `/v1/*`: our JSON (`POST /v1/predict`, `GET /v1/model`); errors
  `{"error": {"status", "code", "message", "details"?}}`.
- `/v2/*`: the Open Inference Protocol (KServe v2, Triton's HTTP API): health, server
  and model metadata, `POST /v2/models/{name}[/versions/{v}]/infer` with a BYTES input
  `text`; errors `{"error": "<message>"}`. Triton's binary tensor data extension is
  accepted for inputs (tritonclient's default) and turned into JSON by the gate; outputs
  are always JSON, which every client of the protocol reads.

Order of checks on `/v1/*` and `/v2/*` (but `/v2/health/*`): API key (401, before the
body is read) -> Content-Type (415) -> body size (413, from Content-Length and from the
bytes actually received) -> JSON syntax (400) -> schema (/v1: 422, /v2: 400) -> limits
on texts (/v1: 422, /v2: 400). Health endpoints and the docs are open.
"""

from __future__ import annotations

import json
import logging
import re
from importlib import metadata
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.schemas import (
    BINARY_HEADER,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelInfo,
    ModelMetadata,
    ModelReady,
    PredictRequest,
    PredictResponse,
    RequestError,
    RequestLimits,
    ServerLive,
    ServerMetadata,
    ServerReady,
    V2Error,
    apply_limits,
    binary_request_to_json,
    class_names,
    error_payload,
    infer_outputs,
    model_metadata,
)
from serve.security import ApiKeyGuard

log = logging.getLogger(__name__)
PROTECTED_PREFIX = "/v1"
V2_PREFIX = "/v2"
V2_OPEN_PREFIX = "/v2/health/"  # probes (Kubernetes, KServe) carry no key
BODY_METHODS = {"POST", "PUT", "PATCH"}
DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII only ("²".isdigit() is True); 18 digits: no int() of a 5000-digit header
V2_INFER = re.compile(r"/v2/models/[^/]+(/versions/[^/]+)?/infer")
SERVER_NAME = "imdb-platform"


class Backend(Protocol):
    """What the HTTP layer needs from a replica."""

    guard: ApiKeyGuard

    def limits(self) -> RequestLimits: ...

    async def predict(self, texts: list[str]) -> list[dict]: ...

    def model_info(self) -> dict | None: ...

    def record_rejection(self, reason: str) -> None: ...


class SafeJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: a lone surrogate echoed from a request (a key named in a
    message, a v2 `id`) is written back as the `\\ud800` escape it came in as, instead of
    failing to encode as UTF-8 (a 500 from the error handler itself)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def is_v2(path: str) -> bool:
    return path == V2_PREFIX or path.startswith(V2_PREFIX + "/")


def is_protected(path: str) -> bool:
    return path.startswith(PROTECTED_PREFIX) or (is_v2(path) and not path.startswith(V2_OPEN_PREFIX))


def json_error(status: int, code: str, message: str, details: list[dict] | None = None, headers: dict | None = None) -> JSONResponse:
    return SafeJSONResponse(error_payload(status, code, message, details), status_code=status, headers=headers)


def v2_error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return SafeJSONResponse({"error": message}, status_code=status, headers=headers)


def error_for(path: str, status: int, code: str, message: str, details: list[dict] | None = None, headers: dict | None = None) -> JSONResponse:
    """The error shape of the protocol `path` belongs to; /v2 has no 422 (a bad request is 400)."""
    if is_v2(path):
        return v2_error(400 if status == 422 else status, message, headers)
    return json_error(status, code, message, details, headers)


def _relative_path(scope: Scope) -> str:
    """The path below the route prefix (Serve puts the prefix in root_path)."""
    path, root = scope.get("path", ""), scope.get("root_path", "").rstrip("/")
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class RequestGate:
    """Pure ASGI middleware: auth, Content-Type and body size on /v1/* and /v2/*, before FastAPI parses anything.

    The body is read here, at most max_body_bytes of it, and replayed to the app: a
    client that lies in Content-Length or streams chunks without one cannot make the
    replica buffer more than the limit. A v2 infer request in Triton's binary format
    (header Inference-Header-Content-Length) is replayed as the equivalent JSON.
    """

    def __init__(self, app: ASGIApp, backend: Backend):
        self.app = app
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = _relative_path(scope) if scope["type"] == "http" else ""
        if scope["type"] != "http" or not is_protected(path):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope, path)
        if refusal is None and scope["method"] in BODY_METHODS:
            body, refusal = await self._read_body(receive, path)
            binary_length = _header(scope, BINARY_HEADER.encode())
            if refusal is None and binary_length is not None and V2_INFER.fullmatch(path):
                try:
                    body = binary_request_to_json(body, binary_length)
                    scope = _with_json_content_type(scope)
                except RequestError as exc:
                    self.backend.record_rejection(exc.code)
                    refusal = v2_error(exc.status, exc.message)
            if refusal is None:
                receive = _replay(body)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope, path: str) -> JSONResponse | None:
        problem = self.backend.guard.problem(_header(scope, b"authorization"))
        if problem:
            self.backend.record_rejection("unauthorized")
            return error_for(path, 401, "unauthorized", problem, headers={"WWW-Authenticate": 'Bearer realm="imdb-serve"'})
        if scope["method"] not in BODY_METHODS:
            return None
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        binary = _header(scope, BINARY_HEADER.encode()) is not None and is_v2(path)
        json_type = content_type == "application/json" or content_type.endswith("+json")
        if content_type and not json_type and not (binary and content_type == "application/octet-stream"):
            self.backend.record_rejection("unsupported_media_type")
            accepted = "application/json" + (" (or application/octet-stream for binary tensor data)" if is_v2(path) else "")
            return error_for(path, 415, "unsupported_media_type", f"Content-Type must be {accepted}, got {content_type!r}")
        limit = self.backend.limits().max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not DIGITS.fullmatch(declared.strip()):
                if declared.strip().isascii() and declared.strip().isdigit():  # more digits than any real body
                    self.backend.record_rejection("body_too_large")
                    return error_for(path, 413, "body_too_large", f"Content-Length has {len(declared.strip())} digits; the limit is {limit} bytes")
                self.backend.record_rejection("bad_content_length")
                return error_for(path, 400, "bad_content_length", f"Content-Length {declared[:40]!r} is not a byte count")
            if int(declared) > limit:
                self.backend.record_rejection("body_too_large")
                return error_for(path, 413, "body_too_large", f"request body is {int(declared)} bytes; the limit is {limit}")
        return None

    async def _read_body(self, receive: Receive, path: str) -> tuple[bytes, JSONResponse | None]:
        limit = self.backend.limits().max_body_bytes
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                self.backend.record_rejection("body_too_large")
                return b"", error_for(path, 413, "body_too_large", f"request body is over the limit of {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), None


def _replay(body: bytes) -> Receive:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    return receive


def _with_json_content_type(scope: Scope) -> Scope:
    headers = [(k, v) for k, v in scope.get("headers", ()) if k.lower() not in (b"content-type", b"content-length")]
    return {**scope, "headers": headers + [(b"content-type", b"application/json")]}


def _describe_validation(errors: list[dict]) -> tuple[int, str, str, list[dict]]:
    """FastAPI/pydantic errors -> (status, code, one readable sentence, details without echoed input)."""
    details = [
        {"loc": [str(part) for part in err.get("loc", ()) if part != "body"], "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in errors
    ]
    json_errors = [err for err in errors if err.get("type") == "json_invalid"]
    if json_errors:
        ctx = json_errors[0].get("ctx") or {}
        loc = json_errors[0].get("loc", ())
        where = f" at character {loc[-1]}" if loc and isinstance(loc[-1], int) else ""
        return 400, "invalid_json", f"request body is not valid JSON ({ctx.get('error', 'decode error')}{where})", details
    if any(err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",) for err in errors):
        return 422, "missing_body", "request body is empty", details
    parts = []
    for detail in details:
        field = ".".join(detail["loc"]) or "body"
        message = detail["msg"].removeprefix("Value error, ")
        if detail["type"] == "string_unicode":  # pydantic's words for a key with a lone surrogate
            message = "a key or string has an unpaired surrogate escape (\\ud800-\\udfff), which is not a Unicode character"
        parts.append(f"{field}: {message}")
    return 422, "invalid_request", "; ".join(parts), details


def _parse_failure(cause: BaseException | None) -> str:
    """Why FastAPI could not read a body as JSON, beyond its "There was an error parsing the body"."""
    if isinstance(cause, UnicodeDecodeError):
        return f" (not UTF-8: {cause.reason} at byte {cause.start})"
    if isinstance(cause, RecursionError):
        return " (JSON nested too deeply)"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return " (a number has too many digits)"
    return ""


def _package_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0"


def build_http_app(backend: Backend, title: str = "IMDB sentiment classifier") -> FastAPI:
    app = FastAPI(
        title=title,
        description=(
            "Classifies texts with the registered model behind an MLflow alias (default `champion`). "
            "`/v1/*` is this server's JSON; `/v2/*` is the Open Inference Protocol (KServe v2), for "
            "KServe, Triton and MLServer clients. Both need `Authorization: Bearer <API key>` when the "
            "server has a key, except the health probes (`/healthz`, `/readyz`, `/v2/health/*`)."
        ),
        version="1",
        docs_url="/docs",
        strict_content_type=False,  # a body without Content-Type is read as JSON
    )
    app.add_middleware(RequestGate, backend=backend)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = _relative_path(request.scope)
        status, code, message, details = _describe_validation(list(exc.errors()))
        if code == "missing_body":
            example = '{"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["..."]}]}' if is_v2(path) else '{"texts": ["..."]} or {"text": "..."}'
            message = f"{message}: send {example}"
        backend.record_rejection(code)
        return error_for(path, status, code, message, details)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        backend.record_rejection(exc.code)
        return error_for(_relative_path(request.scope), exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        message = str(exc.detail) + _parse_failure(exc.__cause__)
        return error_for(_relative_path(request.scope), exc.status_code, code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_for(_relative_path(request.scope), 500, "internal_error", "the server failed to answer this request; it has been logged")

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model is loaded and warm", responses={503: {"model": ErrorResponse}})
    async def readyz() -> Any:
        info = backend.model_info()
        if info is None:
            return json_error(503, "not_ready", "no model loaded yet")
        return {"status": "ready", "model_name": info["name"], "model_version": info["version"]}

    v1 = APIRouter(prefix=PROTECTED_PREFIX, tags=["v1"], responses={status: {"model": ErrorResponse} for status in (401, 404)})
    v1_body_errors = {status: {"model": ErrorResponse} for status in (400, 413, 415, 422)}

    @v1.get("/model", response_model=ModelInfo, summary="The model version this replica serves", responses={503: {"model": ErrorResponse}})
    async def model() -> Any:
        info = backend.model_info()
        if info is None:
            return json_error(503, "not_ready", "no model loaded yet")
        return info

    @v1.post("/predict", response_model=PredictResponse, summary="Classify one or more texts", responses=v1_body_errors)
    async def predict(body: PredictRequest) -> Any:
        texts = body.all_texts()
        backend.limits().check(texts, field="texts" if body.texts is not None else "text")
        predictions = await backend.predict(texts)
        # already plain JSON types: skip FastAPI's re-validation of the response model
        return JSONResponse({"predictions": predictions})

    app.include_router(v1)
    app.include_router(_open_inference_routes(backend))
    _serve_limits_in_openapi(app, backend)
    return app


def _open_inference_routes(backend: Backend) -> APIRouter:
    """/v2: the Open Inference Protocol's REST API over the same backend."""
    v2 = APIRouter(prefix=V2_PREFIX, tags=["v2 (Open Inference Protocol)"], responses={status: {"model": V2Error} for status in (401, 404)})
    not_ready = {503: {"model": V2Error, "description": "no model loaded yet"}}
    infer_errors = {status: {"model": V2Error} for status in (400, 413, 415)}

    def served(name: str, version: str | None) -> dict:
        """The model info if `name` (and `version`) is what this replica serves, else RequestError."""
        info = backend.model_info()
        if info is None:
            raise RequestError(503, "not_ready", "no model loaded yet")
        if name != info["name"]:
            raise RequestError(404, "unknown_model", f"unknown model {name!r}; this server serves {info['name']!r}")
        if version is not None and version != str(info["version"]):
            raise RequestError(404, "unknown_version", f"model {name!r} has no version {version!r} here; it serves version {info['version']}")
        return info

    @v2.get("/health/live", response_model=ServerLive, summary="Server liveness")
    async def live() -> Any:
        return {"live": True}

    @v2.get("/health/ready", response_model=ServerReady, summary="Server readiness: a model is loaded and warm", responses=not_ready)
    async def ready() -> Any:
        if backend.model_info() is None:
            return v2_error(503, "no model loaded yet")
        return {"ready": True}

    @v2.get("", response_model=ServerMetadata, summary="Server metadata")
    async def server_metadata() -> Any:
        return {"name": SERVER_NAME, "version": _package_version(), "extensions": []}

    @v2.get("/models/{model_name}", response_model=ModelMetadata, summary="Model metadata", responses=not_ready)
    async def metadata_of_model(model_name: str) -> Any:
        return model_metadata(served(model_name, None))

    @v2.get("/models/{model_name}/versions/{model_version}", response_model=ModelMetadata, summary="Model version metadata", responses=not_ready)
    async def metadata_of_version(model_name: str, model_version: str) -> Any:
        return model_metadata(served(model_name, model_version))

    @v2.get("/models/{model_name}/ready", response_model=ModelReady, summary="Model readiness", responses=not_ready)
    async def model_ready(model_name: str) -> Any:
        return {"name": served(model_name, None)["name"], "ready": True}

    @v2.get("/models/{model_name}/versions/{model_version}/ready", response_model=ModelReady, summary="Model version readiness", responses=not_ready)
    async def version_ready(model_name: str, model_version: str) -> Any:
        return {"name": served(model_name, model_version)["name"], "ready": True}

    async def infer(model_name: str, model_version: str | None, body: InferenceRequest) -> Any:
        info = served(model_name, model_version)
        texts = body.texts()
        backend.limits().check(texts, field="inputs[0].data")
        wanted = body.output_names()
        predictions = await backend.predict(texts)
        if len({p["model_version"] for p in predictions}) > 1:
            # a hot swap landed between two batches of this request: one answer, one version
            predictions = await backend.predict(texts)
        answered = str(predictions[0]["model_version"])
        if model_version is not None and answered != model_version:
            raise RequestError(404, "unknown_version", f"model {model_name!r} version {model_version!r} is no longer served; version {answered} is")
        response = {"model_name": info["name"], "model_version": answered}
        if body.id is not None:
            response["id"] = body.id
        response["outputs"] = infer_outputs(predictions, class_names(info), wanted)
        return SafeJSONResponse(response)

    @v2.post("/models/{model_name}/infer", response_model=InferenceResponse, summary="Classify the texts of a BYTES tensor", responses={**infer_errors, **not_ready})
    async def infer_model(model_name: str, body: InferenceRequest) -> Any:
        return await infer(model_name, None, body)

    @v2.post(
        "/models/{model_name}/versions/{model_version}/infer",
        response_model=InferenceResponse,
        summary="Classify with a given model version (404 if this server serves another)",
        responses={**infer_errors, **not_ready},
    )
    async def infer_version(model_name: str, model_version: str, body: InferenceRequest) -> Any:
        return await infer(model_name, model_version, body)

    return v2


def _serve_limits_in_openapi(app: FastAPI, backend: Backend) -> None:
    """/openapi.json with this replica's current limits filled in, and the API key as a security scheme.

    FastAPI builds the document once; the limits can change on a live deployment
    (user_config), so the copy with limits is rebuilt when they do.
    """
    build = app.openapi
    served: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        limits = backend.limits()
        if served.get("limits") != limits:
            document = apply_limits(build(), limits)
            if backend.guard.enabled:
                document.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "the server's API key",
                }
                for path, operations in document.get("paths", {}).items():
                    if is_protected(path):
                        for operation in operations.values():
                            operation["security"] = [{"apiKey": []}]
            served.update(limits=limits, document=document)
        return served["document"]

    app.openapi = openapi  # type: ignore[method-assign]
