"""Connect to a Ray cluster, or start a local one sized for the machine, and read the cluster's size.

The object store is sized here, so a container with a small /dev/shm does not fail at
the first large block; workers' environments come from pipelines.cluster.worker_env.
"""

from __future__ import annotations

import logging
import os
import shutil

import ray

from pipelines.cluster.worker_env import WORKER_ENV, worker_env
from pipelines.core import stopping
from pipelines.core.ports import free_port

log = logging.getLogger(__name__)


MIN_OBJECT_STORE = 256 * 1024**2
MAX_LOCAL_OBJECT_STORE = 4 * 1024**3


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
        with stopping.kept_handlers():  # ray.init's SIGTERM handler would exit without a word
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # Ray's State API, which Train's placement-group cleaner relies on when Tune stops a
    # trial, finds "the" local cluster by scanning processes; with two clusters on one
    # machine it asks the wrong one (or fails), and a live trial's placement group gets
    # removed or a dead one's leaks. Fixing the GCS port up front lets every worker be
    # told its own cluster's address.
    gcs_port = free_port("")  # the GCS listens on every interface of the head
    address = f"{ray.util.get_node_ip_address()}:{gcs_port}"
    runtime_env["env_vars"]["RAY_ADDRESS"] = address
    previous_port = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(gcs_port)
    try:
        with stopping.kept_handlers():  # Ray's node would answer SIGTERM by killing the raylet under its agents
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
    # the node's processes (GCS, raylet, dashboard, monitors): shutdown_ray ends all below them.
    # Ray lists them only on its private node object; without it, ray.shutdown() alone runs.
    node = getattr(ray._private.worker, "_global_node", None)
    stopping.track_local_ray(process.pid for _, process in (node.live_processes() if node is not None else ()))
    if ray.get_runtime_context().gcs_address != address:
        log.warning("the local Ray is at %s, not %s", ray.get_runtime_context().gcs_address, address)
    log.info("started a local Ray at %s: %s", ray.get_runtime_context().gcs_address, ray.cluster_resources())


_STARTED_LOCALLY = False


def is_local_cluster() -> bool:
    """True when this process started the Ray it uses (it cannot autoscale)."""
    return _STARTED_LOCALLY


def shutdown_ray() -> None:
    """ray.shutdown(); a local Ray's processes that outlive it (the raylet's agents) are ended too."""
    stopping.shutdown_ray()


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0))


def alive_node_count() -> int:
    return sum(1 for node in ray.nodes() if node.get("Alive"))


def largest_node_cpus() -> float:
    """CPUs of the biggest alive node: where Ray Train packs its workers first."""
    return max((float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")), default=0.0)


def object_store_bytes() -> float:
    """The cluster's object store capacity (every node's together)."""
    return float(ray.cluster_resources().get("object_store_memory", 0))
