"""A free TCP port for a server we are about to start (Ray's GCS, HAProxy's pages, test servers)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now on `host` ("" = every interface).

    The OS picks it; the port is free again when this returns, so a small race with
    other processes remains until the server binds it.
    """
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
