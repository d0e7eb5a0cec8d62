"""Send a prediction again when the replica running it died: an ASGI middleware in Serve's HTTP proxy.

Why in the proxy, and why this way (read in Ray 2.60's ray/serve/_private):

- Serve does not re-send a request that a replica accepted and then died on. Its router
  routes again only a request that a replica rejected or never got (router.py,
  `route_and_send_request`); once a replica runs it, the ActorDiedError goes up to the
  proxy, which maps it to 500 (http_util.py, `get_http_response_status`) and, for a 500,
  sends no response of its own (`send_http_response_on_exception`): the proxy's ASGI app
  returns without having started a response, and uvicorn writes a bare 500.
- serve/http_api.py answers every request it gets, errors included (a JSON body for
  every status). So "the proxy's app returned without a response" means no replica
  answered: the replica died mid-request (or the proxy failed before reaching one). The
  408 of the proxy's request timeout and its 503s are responses, and are passed on.
- Serve runs middlewares in its proxy by its own hook: `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`
  names a function returning Starlette middlewares, which each proxy calls when it starts
  (from the environment of Ray's processes: serve/http_proxy.py `use_proxy_retry` sets it).

Only predictions are sent again (`/v1/predict`, `/v2/models/.../infer`: idempotent, the same
answer twice), with their body kept in memory up to MAX_KEPT_BODY_BYTES (the limit on
bodies is 2 MiB by default; a larger one goes through once, not kept). At most MAX_ATTEMPTS
tries, BACKOFF_S apart and doubling (the router needs a moment to drop the dead replica);
then the protocol's 503 `model_unavailable` error. A retried answer carries
`X-Serve-Attempts: <n>`; each re-send counts in `ray_imdb_request_retries_total`.
A client that hung up is not answered again.

A proxy that has just started (Serve replaces a dead one in seconds) answers 404 "Path ...
not found" to every request until the controller has sent it the route table, about a second
later (proxy_router.py: its /-/healthz says "Route table is not populated yet" meanwhile). A
404 tells a client the endpoint does not exist, so that 404 of Serve's own (plain text; the
app's are JSON) to a prediction is held back and the prediction sent again, ROUTES_POLL_S
apart, for up to ROUTES_WAIT_S; only then is the 404 passed on (a path that really is
unknown under that prefix).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re

from starlette.middleware import Middleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("ray.serve")
PREDICTION_PATH = re.compile(r"/v1/predict|/v2/models/[^/]+(/versions/[^/]+)?/infer")
MAX_ATTEMPTS = 3  # 1 try + 2 re-sends: a second death in a row means something bigger is wrong
BACKOFF_S = 0.05  # before the first re-send; doubles each time
MAX_KEPT_BODY_BYTES = 4 * 1024 * 1024
ATTEMPTS_HEADER = b"x-serve-attempts"
ROUTES_WAIT_S = 3.0  # a new proxy gets its route table about a second after it starts
ROUTES_POLL_S = 0.2


def middlewares() -> list[Middleware]:
    """What RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy_retry:middlewares gives Serve's proxy."""
    return [Middleware(ResendLostPredictions)]


def is_prediction(scope: Scope) -> bool:
    """A POST to a prediction route, under any route prefix."""
    return scope["type"] == "http" and scope.get("method") == "POST" and PREDICTION_PATH.search(scope.get("path", "")) is not None


class ResendLostPredictions:
    """Runs a prediction through the proxy again while no replica answered it (see the module docstring)."""

    def __init__(self, app: ASGIApp, max_attempts: int = MAX_ATTEMPTS, backoff_s: float = BACKOFF_S,
                 routes_wait_s: float = ROUTES_WAIT_S, routes_poll_s: float = ROUTES_POLL_S):
        self.app = app
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.routes_wait_s, self.routes_poll_s = routes_wait_s, routes_poll_s
        self._metrics = None  # made at the first re-send: most proxies never need one

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_prediction(scope):
            await self.app(scope, receive, send)
            return
        body, whole = await read_body(receive)
        if not whole:  # too large to keep: one try, the rest of the body streamed after what was read
            await self.app(scope, Replay(body, receive), send)
            return
        answer = Answer(send)
        attempt, waited_for_routes = 1, 0.0
        while True:
            client = Replay(body, receive)
            await self.app(scope, client, answer.send_with_attempts(attempt))
            if answer.started or client.hung_up:
                return
            if answer.held:  # this proxy knows no route for it: just started, or a wrong path
                if waited_for_routes >= self.routes_wait_s:
                    await answer.pass_held_on()
                    return
                await asyncio.sleep(self.routes_poll_s)
                waited_for_routes += self.routes_poll_s
                continue
            if attempt >= self.max_attempts:
                break
            attempt += 1
            log.warning("no replica answered %s (it died?); sending it again, attempt %d of %d", scope["path"], attempt, self.max_attempts)
            self._record("resent")
            await asyncio.sleep(self.backoff_s * 2 ** (attempt - 2))
        log.error("no replica answered %s in %d attempts; answering 503", scope["path"], self.max_attempts)
        self._record("gave_up")
        await send_unavailable(scope, send, self.max_attempts)

    def _record(self, outcome: str) -> None:
        try:
            if self._metrics is None:
                from serve.metrics import ProxyRetryMetrics

                self._metrics = ProxyRetryMetrics()
            self._metrics.record(outcome)
        except Exception as exc:  # noqa: BLE001 - a metric must never fail a request
            log.debug("could not record a retry metric: %r", exc)


class Answer:
    """The client's `send`, noting whether a response started; a re-sent answer says how many tries it took.

    The proxy's own "no such route" 404 is held back (`held`), not sent: the caller decides.
    """

    def __init__(self, send: Send):
        self._send = send
        self.started = False
        self.held: list[Message] = []

    def send_with_attempts(self, attempt: int) -> Send:
        self.held = []

        async def send(message: Message) -> None:
            if (message["type"] == "http.response.start" and is_route_not_found(message)) or self.held:
                self.held.append(message)
                return
            if message["type"] == "http.response.start":
                self.started = True
                if attempt > 1:
                    message = {**message, "headers": [*message.get("headers", []), (ATTEMPTS_HEADER, str(attempt).encode())]}
            await self._send(message)

        return send

    async def pass_held_on(self) -> None:
        self.started = True
        for message in self.held:
            await self._send(message)


def is_route_not_found(start: Message) -> bool:
    """Serve's proxy's own 404 (plain text: "Path '...' not found"); the app's 404s are JSON."""
    content_type = dict(start.get("headers", [])).get(b"content-type", b"")
    return start.get("status") == 404 and content_type.startswith(b"text/plain")


async def read_body(receive: Receive) -> tuple[list[Message], bool]:
    """The request's body messages, read up to MAX_KEPT_BODY_BYTES; (messages, whether that is all of it)."""
    messages, size = [], 0
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            return messages, True  # a disconnect: replayed as is, the proxy handles it
        size += len(message.get("body", b""))
        if not message.get("more_body", False):
            return messages, True
        if size > MAX_KEPT_BODY_BYTES:
            return messages, False


class Replay:
    """An ASGI `receive` giving the kept body messages, then the client's own `receive` (which
    blocks until the client hangs up: the proxy watches it to cancel abandoned requests)."""

    def __init__(self, messages: list[Message], receive: Receive):
        self._messages = list(messages)
        self._receive = receive
        self.hung_up = any(m["type"] == "http.disconnect" for m in messages)

    async def __call__(self) -> Message:
        if self._messages:
            return self._messages.pop(0)
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self.hung_up = True
        return message


async def send_unavailable(scope: Scope, send: Send, attempts: int) -> None:
    """The protocol's 503 (serve/http_api.py's error shapes): /v2 `{"error": msg}`, /v1 `{"error": {...}}`."""
    message = f"the model replica answering this request died, {attempts} time(s); try again"
    if "/v2/" in scope.get("path", ""):
        payload: dict = {"error": message}
    else:
        payload = {"error": {"status": 503, "code": "model_unavailable", "message": message}}
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (ATTEMPTS_HEADER, str(attempts).encode())]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})
