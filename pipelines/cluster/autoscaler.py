"""Ask the autoscaler for the bundles a job needs, wait a bounded time for them, and always withdraw the request."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from pipelines.core import console

log = logging.getLogger(__name__)


def autoscaler_max_gpus() -> float | None:
    """How many GPUs the cluster's node types could add up to, or None when no autoscaler says.

    Read from the cluster config the autoscaler publishes in the GCS (Ray Data reads it
    the same way); a private API, so any failure means "unknown".
    """
    try:
        import ray._private.state

        maximum = ray._private.state.state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - older/newer Ray, no autoscaler: unknown
        return None
    return float(maximum.get("GPU", 0)) if maximum else None


@contextmanager
def autoscaler_request(bundles: list[dict], ready: Callable[[], bool], what: str, timeout_s: float) -> Iterator[bool]:
    """Ask the autoscaler for `bundles`, wait (bounded) until `ready()`, withdraw on exit.

    A request stays in force until replaced: without the withdrawal, the nodes a job
    asked for (GPU nodes included) would stay up after it ends. The withdrawal runs on
    success, failure and Ctrl-C alike. Yields whether an autoscaler took the request.
    """
    from ray.autoscaler.sdk import request_resources

    try:
        request_resources(bundles=bundles)
    except Exception as exc:  # noqa: BLE001 - a cluster without an autoscaler: nothing to ask
        log.info("no autoscaler to ask for resources (%s)", exc)
        yield False
        return
    try:
        deadline = time.monotonic() + timeout_s
        if not ready():
            console.stage("resources", f"waiting for the autoscaler to start {what} (up to {timeout_s:.0f} s)")
        while not ready():
            if time.monotonic() > deadline:
                log.warning("the autoscaler did not provide %s within %.0f s; going on with what is up", what, timeout_s)
                console.warn(f"the autoscaler did not provide {what} within {timeout_s:.0f} s; going on with what is up "
                             "(raise $PLATFORM_RESOURCE_WAIT_S, or see the autoscaler's log: ray monitor cluster.yaml)")
                break
            log.info("waiting for the autoscaler: %s (up to %.0f s more)", what, deadline - time.monotonic())
            time.sleep(10)
        yield True
    finally:
        try:
            request_resources(bundles=[])
            log.info("withdrew the autoscaler request for %s", what)
        except Exception as exc:  # noqa: BLE001 - the cluster may be gone already
            log.warning("could not withdraw the autoscaler request for %s: %s", what, exc)
