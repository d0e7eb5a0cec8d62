"""The FastAPI app a replica serves: routes, the request gate (auth, size, type), and JSON errors.

`build_http_app(backend)` is called once per replica (Serve's late-bound ingress,
`__serve_build_asgi_app__`), so the routes close over that replica's backend and
nothing but the request itself is built per request. It needs no Serve: tests can
mount it on any ASGI server.

Order of checks on `/v1/*`: API key (401, before the body is read) -> Content-Type
(415) -> body size (413, from Content-Length and from the bytes actually received)
-> JSON syntax (400) -> schema (422) -> limits on texts (422). Health endpoints and
the docs are open.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.schemas import (
    ErrorResponse,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    RequestError,
    RequestLimits,
    error_payload,
)
from serve.security import ApiKeyGuard

log = logging.getLogger(__name__)
PROTECTED_PREFIX = "/v1"
BODY_METHODS = {"POST", "PUT", "PATCH"}


class Backend(Protocol):
    """What the HTTP layer needs from a replica."""

    guard: ApiKeyGuard

    def limits(self) -> RequestLimits: ...

    async def predict(self, texts: list[str]) -> list[dict]: ...

    def model_info(self) -> dict | None: ...

    def record_rejection(self, reason: str) -> None: ...


def json_error(status: int, code: str, message: str, details: list[dict] | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_payload(status, code, message, details), status_code=status, headers=headers)


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
    """Pure ASGI middleware: auth, Content-Type and body size on /v1/*, before FastAPI parses anything.

    The body is read here, at most max_body_bytes of it, and replayed to the app: a
    client that lies in Content-Length or streams chunks without one cannot make the
    replica buffer more than the limit.
    """

    def __init__(self, app: ASGIApp, backend: Backend):
        self.app = app
        self.backend = backend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _relative_path(scope).startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is None and scope["method"] in BODY_METHODS:
            body, refusal = await self._read_body(receive)
            if refusal is None:
                receive = _replay(body)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        problem = self.backend.guard.problem(_header(scope, b"authorization"))
        if problem:
            self.backend.record_rejection("unauthorized")
            return json_error(401, "unauthorized", problem, headers={"WWW-Authenticate": 'Bearer realm="imdb-serve"'})
        if scope["method"] not in BODY_METHODS:
            return None
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        if content_type and content_type != "application/json" and not content_type.endswith("+json"):
            self.backend.record_rejection("unsupported_media_type")
            return json_error(415, "unsupported_media_type", f"Content-Type must be application/json, got {content_type!r}")
        limit = self.backend.limits().max_body_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                self.backend.record_rejection("bad_content_length")
                return json_error(400, "bad_content_length", f"Content-Length {declared!r} is not a byte count")
            if int(declared) > limit:
                self.backend.record_rejection("body_too_large")
                return json_error(413, "body_too_large", f"request body is {int(declared)} bytes; the limit is {limit}")
        return None

    async def _read_body(self, receive: Receive) -> tuple[bytes, JSONResponse | None]:
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
                return b"", json_error(413, "body_too_large", f"request body is over the limit of {limit} bytes")
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
        return 422, "missing_body", 'request body is empty: send {"texts": ["..."]} or {"text": "..."}', details
    parts = []
    for detail in details:
        field = ".".join(detail["loc"]) or "body"
        message = detail["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {message}")
    return 422, "invalid_request", "; ".join(parts), details


def build_http_app(backend: Backend, title: str = "IMDB sentiment classifier") -> FastAPI:
    app = FastAPI(
        title=title,
        description=(
            "Classifies texts with the registered model behind an MLflow alias (default `champion`). "
            "`/v1/*` needs `Authorization: Bearer <API key>` when the server has a key."
        ),
        version="1",
        docs_url="/docs",
        strict_content_type=False,  # a body without Content-Type is read as JSON
        responses={status: {"model": ErrorResponse} for status in (400, 401, 413, 415, 422)},
    )
    app.add_middleware(RequestGate, backend=backend)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        status, code, message, details = _describe_validation(list(exc.errors()))
        backend.record_rejection(code)
        return json_error(status, code, message, details)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        backend.record_rejection(exc.code)
        return json_error(exc.status, exc.code, exc.message, exc.details)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
        return json_error(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return json_error(500, "internal_error", "the server failed to answer this request; it has been logged")

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: a model is loaded and warm", responses={503: {"model": ErrorResponse}})
    async def readyz() -> Any:
        info = backend.model_info()
        if info is None:
            return json_error(503, "not_ready", "no model loaded yet")
        return {"status": "ready", "model_name": info["name"], "model_version": info["version"]}

    @app.get(f"{PROTECTED_PREFIX}/model", response_model=ModelInfo, summary="The model version this replica serves")
    async def model() -> Any:
        info = backend.model_info()
        if info is None:
            return json_error(503, "not_ready", "no model loaded yet")
        return info

    @app.post(f"{PROTECTED_PREFIX}/predict", response_model=PredictResponse, summary="Classify one or more texts")
    async def predict(body: PredictRequest) -> Any:
        texts = body.all_texts()
        backend.limits().check(texts, field="texts" if body.texts is not None else "text")
        predictions = await backend.predict(texts)
        # already plain JSON types: skip FastAPI's re-validation of the response model
        return JSONResponse({"predictions": predictions})

    return app
