"""Connect to a Ray cluster, or start a local one sized for the machine.

One place decides the runtime environment every Ray worker gets (tokenizer
threads off, offline hub flags passed through) and the object store size, so a
container with a small /dev/shm does not fail at the first large block.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import ray

log = logging.getLogger(__name__)

# Passed to every Ray worker: Rust tokenizers would otherwise start a thread pool
# per actor and oversubscribe the CPUs that Ray already divides between actors.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}
# Passed through when set on the driver, so offline runs stay offline on workers.
PASSTHROUGH_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "MLFLOW_TRACKING_URI",
    "PLATFORM_STORAGE",
    "PLATFORM_FAIL_AT_EPOCH",  # fault-injection switch used by the tests
    # where the object store is; never the credentials: a runtime environment is shown
    # in the dashboard, and every node has its own (instance profile, env, secret)
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_EC2_METADATA_DISABLED",
    "MLFLOW_S3_ENDPOINT_URL",
)
MIN_OBJECT_STORE = 256 * 1024**2
MAX_LOCAL_OBJECT_STORE = 4 * 1024**3


def worker_env() -> dict[str, str]:
    env = dict(WORKER_ENV)
    env.update({name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ})
    return env


def local_object_store_bytes() -> int:
    """At most half of /dev/shm (containers often give 64 MB) and at most 4 GiB."""
    try:
        shm_free = shutil.disk_usage("/dev/shm").free
    except OSError:
        return MIN_OBJECT_STORE
    return int(max(MIN_OBJECT_STORE, min(shm_free // 2, MAX_LOCAL_OBJECT_STORE)))


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join `address` (or $RAY_ADDRESS), else start a local Ray; no-op if already up."""
    if ray.is_initialized():
        return
    os.environ.update(WORKER_ENV)
    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": worker_env()}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # Ray's State API, which Train's placement-group cleaner relies on when Tune stops a
    # trial, finds "the" local cluster by scanning processes; with two clusters on one
    # machine it asks the wrong one (or fails), and a live trial's placement group gets
    # removed or a dead one's leaks. Fixing the GCS port up front lets every worker be
    # told its own cluster's address.
    gcs_port = _free_port()
    address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    runtime_env["env_vars"]["RAY_ADDRESS"] = address
    previous_port = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    try:
        ray.init(
            # "local": always a new cluster of our own, never one that `ray start` left running
            address="local",
            num_cpus=num_cpus,
            object_store_memory=local_object_store_bytes(),
            runtime_env=runtime_env,
            include_dashboard=True,  # Tune frees stopped trials' placement groups through it
            log_to_driver=True,
        )
    finally:
        if previous_port is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous_port
    global _STARTED_LOCALLY
    _STARTED_LOCALLY = True
    if ray.get_runtime_context().gcs_address != address:
        log.warning("the local Ray is at %s, not %s", ray.get_runtime_context().gcs_address, address)
    log.info("started a local Ray at %s: %s", ray.get_runtime_context().gcs_address, ray.cluster_resources())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


_STARTED_LOCALLY = False


def is_local_cluster() -> bool:
    """True when this process started the Ray it uses (it cannot autoscale)."""
    return _STARTED_LOCALLY


def shutdown_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def alive_node_count() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def object_store_bytes() -> float:
    """The cluster's object store capacity (every node's together)."""
    return float(ray.cluster_resources().get("object_store_memory", 0))


# --- the autoscaler ------------------------------------------------------------------

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
        while not ready():
            if time.monotonic() > deadline:
                log.warning("the autoscaler did not provide %s within %.0f s; going on with what is up", what, timeout_s)
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
