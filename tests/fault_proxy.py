"""A reverse proxy that injects faults between the platform and a real server (MLflow, S3).

    proxy = FaultProxy("http://127.0.0.1:5000").start()
    proxy.arm(Fault("GET", "/registered-models/get", "503"))     # the next matching request only
    ... point the client at proxy.url ...

Every request is forwarded as it came unless an armed fault matches it (method, and a
piece of the path): then, instead of forwarding, the proxy answers 503, hangs past the
client's timeout, resets the connection, holds it a while and then forwards it (`delay`), or kills the client process (`kill -9`, as a crash
at that step). A fault fires on the `skip`+1-th match (counted
from when a request matching `after` went through, if given) and then `times` times (None: for
good). What it did is in `proxy.log`: (method, path, action).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ACTIONS = ("503", "timeout", "reset", "kill", "delay")


@dataclass
class Fault:
    method: str
    path_part: str
    action: str  # one of ACTIONS
    skip: int = 0  # matching requests let through first
    times: int | None = 1  # how many it hits; None: every one after the skipped
    hang_s: float = 6.0  # "timeout": how long the proxy holds the request before dropping it; "delay": before forwarding it
    after: str | None = None  # armed only once a request whose path holds this has gone through
    kill_pid: int | None = None  # "kill": the client process to SIGKILL instead of answering (kill -9 mid-step)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r}: one of {ACTIONS}")

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and self.path_part in path


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def arm(self, *faults: Fault) -> None:
        with self._lock:
            self.faults = list(faults)
            self.log.clear()

    def clear(self) -> None:
        self.arm()

    def fired(self) -> list[tuple[str, str, str]]:
        return [entry for entry in self.log if entry[2] != "forwarded"]

    def _decide(self, method: str, path: str) -> str:
        with self._lock:
            for fault in self.faults:
                if fault.after is not None and not any(fault.after in seen for _, seen, action in self.log if action == "forwarded"):
                    continue
                if not fault.matches(method, path):
                    continue
                if fault.skip > 0:
                    fault.skip -= 1
                    break
                if fault.times is None or fault.times > 0:
                    if fault.times is not None:
                        fault.times -= 1
                    self.log.append((method, path, fault.action))
                    return fault.action
            self.log.append((method, path, "forwarded"))
            return "forward"

    def _handler_class(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                body = self._read_body()
                action = proxy._decide(self.command, self.path)
                if action == "503":
                    payload = json.dumps({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "injected by the fault proxy"}).encode()
                    self.send_response(503)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if action == "delay":  # a slow server: held, then forwarded
                    time.sleep(self._fault_hang())
                    self._forward(body)
                    return
                if action == "timeout":
                    time.sleep(self._fault_hang())
                    self.close_connection = True
                    return
                if action == "kill":
                    victim = next((f.kill_pid for f in proxy.faults if f.action == "kill" and f.kill_pid), None)
                    if victim:
                        os.kill(victim, signal.SIGKILL)
                    self.close_connection = True
                    return
                if action == "reset":
                    # SO_LINGER 0: close() sends a RST, as a crashed server or a middlebox would
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                self._forward(body)

            def _read_body(self) -> bytes:
                """The body as it came: S3 clients send theirs chunked (aws-chunked, with trailers), forwarded as is."""
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        break
                    raw += self.rfile.read(size + 2)  # the chunk and its CRLF
                while True:  # trailers, then the empty line that ends the body
                    line = self.rfile.readline()
                    raw += line
                    if line in (b"\r\n", b"\n", b""):
                        return raw

            def _fault_hang(self) -> float:
                return max((f.hang_s for f in proxy.faults if f.action == "timeout"), default=6.0)

            def _forward(self, body: bytes) -> None:
                upstream = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=60)
                # the body is read already: no `Expect: 100-continue` upstream; a chunked one goes on chunked
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "expect")}
                upstream.request(self.command, self.path, body=body or None, headers=headers, encode_chunked=False)
                answer = upstream.getresponse()
                payload = answer.read()
                self.send_response(answer.status)
                for key, value in answer.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # HEAD: the length of what a GET would send (S3 reads an object's size there), no body
                length = answer.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(payload))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)
                upstream.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        return Handler
