"""Connect to a Ray cluster, or start a local one sized for the machine.

One place decides the runtime environment every Ray worker gets (tokenizer
threads off, offline hub flags passed through) and the object store size, so a
container with a small /dev/shm does not fail at the first large block.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import ray

from pipelines import console
from pipelines.config import TrainConfig
from pipelines.errors import ConfigError
from pipelines.ports import free_port
from pipelines.streaming import DataResources

log = logging.getLogger(__name__)

# Passed to every Ray worker: Rust tokenizers would otherwise start a thread pool
# per actor and oversubscribe the CPUs that Ray already divides between actors.
# Ray Train's print patch logs every print of a worker and prints it as well: each line
# reached the driver twice.
WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
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
# CPUs left free for Ray Data next to the Train workers (tokenizer tasks at 0.25, reads at
# 0.1, three splits streaming at once); without them the run hangs in backpressure.
DATA_CPU_RESERVE = 0.6
MIN_OBJECT_STORE = 256 * 1024**2
MAX_LOCAL_OBJECT_STORE = 4 * 1024**3


def worker_env() -> dict[str, str]:
    from pipelines.tracking import users_tracking_uri

    env = dict(WORKER_ENV)
    env.update({name: os.environ[name] for name in PASSTHROUGH_ENV if name in os.environ})
    if not users_tracking_uri():
        # only MLflow's export for an earlier run in this process: workers would take it
        # for the user's store in every later run (pipelines.tracking)
        env.pop("MLFLOW_TRACKING_URI", None)
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
    gcs_port = free_port("")  # the GCS listens on every interface of the head
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


def largest_node_cpus() -> float:
    """CPUs of the biggest alive node: where Ray Train packs its workers first."""
    return max((float(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node.get("Alive")), default=0.0)


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


# --- sizing a training run to the cluster --------------------------------------------

def wants_gpus(config: TrainConfig) -> bool:
    """--use-gpu yes, or auto on a cluster whose node types can add GPUs for every worker."""
    if config.use_gpu != "auto":
        return config.use_gpu == "yes"
    if cluster_gpus() >= config.num_workers:
        return True
    possible = autoscaler_max_gpus()
    return possible is not None and possible >= config.num_workers


@contextmanager
def requested_resources(config: TrainConfig) -> Iterator[None]:
    """On an autoscaling cluster (`ray up`, KubeRay): ask for the workers' resources, wait, withdraw at the end.

    GPU worker types start at 0 nodes: without this request the checks of
    plan_resources would refuse a run that the autoscaler could have served, and
    --use-gpu auto would train on CPUs because no GPU node happened to be up. Local
    clusters cannot grow: they fail at once with the numbers.
    """
    if not (config.ray_address or os.environ.get("RAY_ADDRESS")) or is_local_cluster():
        yield
        return
    gpus_wanted = config.num_workers if wants_gpus(config) else 0
    bundle = {"CPU": config.cpus_per_worker, **({"GPU": 1} if gpus_wanted else {})}

    def ready() -> bool:
        return cluster_cpus() >= config.num_workers * config.cpus_per_worker + DATA_CPU_RESERVE and cluster_gpus() >= gpus_wanted

    what = f"{config.num_workers} worker(s) of {bundle}"
    with autoscaler_request([bundle] * config.num_workers, ready, what, float(os.environ.get("PLATFORM_RESOURCE_WAIT_S", "900"))):
        yield


@dataclass(frozen=True)
class ResourcePlan:
    """What a training run gets: devices, the data pipeline's share, torch threads per worker."""

    use_gpu: bool
    data: DataResources
    threads_per_worker: int
    tokenized_up_front: bool
    cluster_cpus: float
    cluster_gpus: float

    def describe(self, num_workers: int) -> str:
        """One line for the console, e.g. '2 CPUs: 1 worker x 2 threads; data tokenized up front'."""
        hardware = f"{self.cluster_cpus:g} CPUs" + (f", {self.cluster_gpus:g} GPUs" if self.cluster_gpus else "")
        workers = f"{num_workers} worker{'s' if num_workers > 1 else ''} x {self.threads_per_worker} thread{'s' if self.threads_per_worker > 1 else ''}"
        device = " + 1 GPU each" if self.use_gpu else ""
        data = "data tokenized up front" if self.tokenized_up_front else "data streamed and tokenized every epoch"
        return f"{hardware}: {workers}{device}; {data}"


def plan_threads(config: TrainConfig, use_gpu: bool, tokenized_up_front: bool, node_cpus: float) -> int:
    """Torch threads per worker: on CPUs, the node's CPUs that Ray Data does not need.

    Ray's logical CPUs only decide placement; torch uses as many threads as it is
    told. With the token ids cached, Ray Data has nothing left to do while training
    runs, so the workers on a node share all its CPUs; when streaming, the tokenizer
    actors keep their reserve. On GPUs the math runs on the GPU: --cpus-per-worker.
    """
    if config.threads_per_worker:
        return config.threads_per_worker
    if use_gpu:
        return max(1, int(config.cpus_per_worker))
    workers_on_node = max(1, min(config.num_workers, int(node_cpus // config.cpus_per_worker)))
    free = node_cpus - (0.0 if tokenized_up_front else DATA_CPU_RESERVE)
    return max(1, int(free // workers_on_node))


def plan_resources(config: TrainConfig, tokenized_up_front: bool) -> ResourcePlan:
    """Devices, data sizing and threads; errors if the workers cannot fit.

    Call it inside `requested_resources(config)` on an autoscaling cluster.
    """
    cpus, gpus = cluster_cpus(), cluster_gpus()
    use_gpu = {"yes": True, "no": False, "auto": gpus >= config.num_workers}[config.use_gpu]
    if use_gpu and gpus < config.num_workers:
        raise ConfigError(f"--use-gpu yes with --num-workers {config.num_workers}, but the cluster has {gpus:g} GPUs")
    needed = config.num_workers * config.cpus_per_worker
    if needed + DATA_CPU_RESERVE > cpus + 1e-9:
        raise ConfigError(
            f"--num-workers {config.num_workers} x --cpus-per-worker {config.cpus_per_worker:g} = {needed:g} CPUs, "
            f"but the cluster has {cpus:g} and the data pipeline needs ~{DATA_CPU_RESERVE} more: lower one of them"
        )
    threads = plan_threads(config, use_gpu, tokenized_up_front, largest_node_cpus() or cpus)
    return ResourcePlan(use_gpu, DataResources.for_cluster(cpus - needed), threads, tokenized_up_front, cpus, gpus)
