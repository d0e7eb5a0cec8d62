"""The resource plan of a run: GPUs or not, workers' CPUs and threads, what is left for Ray Data; and the autoscaler request while it waits."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from pipelines.cluster import autoscaler, runtime
from pipelines.core.errors import ConfigError
from pipelines.data.reading import DataResources
from pipelines.training.settings import TrainConfig

# CPUs left free for Ray Data next to the Train workers (tokenizer tasks at 0.25, reads at
# 0.1, three splits streaming at once); without them the run hangs in backpressure.
DATA_CPU_RESERVE = 0.6


def wants_gpus(config: TrainConfig) -> bool:
    """--use-gpu yes, or auto on a cluster whose node types can add GPUs for every worker."""
    if config.use_gpu != "auto":
        return config.use_gpu == "yes"
    if runtime.cluster_gpus() >= config.num_workers:
        return True
    possible = autoscaler.autoscaler_max_gpus()
    return possible is not None and possible >= config.num_workers


@contextmanager
def requested_resources(config: TrainConfig) -> Iterator[None]:
    """On an autoscaling cluster (`ray up`, KubeRay): ask for the workers' resources, wait, withdraw at the end.

    GPU worker types start at 0 nodes: without this request the checks of
    plan_resources would refuse a run that the autoscaler could have served, and
    --use-gpu auto would train on CPUs because no GPU node happened to be up. Local
    clusters cannot grow: they fail at once with the numbers.
    """
    if not (config.ray_address or os.environ.get("RAY_ADDRESS")) or runtime.is_local_cluster():
        yield
        return
    gpus_wanted = config.num_workers if wants_gpus(config) else 0
    bundle = {"CPU": config.cpus_per_worker, **({"GPU": 1} if gpus_wanted else {})}

    def ready() -> bool:
        return runtime.cluster_cpus() >= config.num_workers * config.cpus_per_worker + DATA_CPU_RESERVE and runtime.cluster_gpus() >= gpus_wanted

    what = f"{config.num_workers} worker(s) of {bundle}"
    with autoscaler.autoscaler_request([bundle] * config.num_workers, ready, what, float(os.environ.get("PLATFORM_RESOURCE_WAIT_S", "900"))):
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
    cpus, gpus = runtime.cluster_cpus(), runtime.cluster_gpus()
    use_gpu = {"yes": True, "no": False, "auto": gpus >= config.num_workers}[config.use_gpu]
    if config.use_gpu == "auto" and not use_gpu and not config.cpu_fallback:
        possible = autoscaler.autoscaler_max_gpus()
        if possible is not None and possible >= config.num_workers:  # GPU nodes were asked for and did not come
            raise ConfigError(
                f"--use-gpu auto: the cluster can add {possible:g} GPUs but has {gpus:g} after waiting "
                f"{os.environ.get('PLATFORM_RESOURCE_WAIT_S', '900')} s for {config.num_workers}; not training on CPUs "
                "without --cpu-fallback (or see why the GPU nodes did not start: ray monitor cluster.yaml)"
            )
    if use_gpu and gpus < config.num_workers:
        raise ConfigError(f"--use-gpu yes with --num-workers {config.num_workers}, but the cluster has {gpus:g} GPUs")
    needed = config.num_workers * config.cpus_per_worker
    if needed + DATA_CPU_RESERVE > cpus + 1e-9:
        raise ConfigError(
            f"--num-workers {config.num_workers} x --cpus-per-worker {config.cpus_per_worker:g} = {needed:g} CPUs, "
            f"but the cluster has {cpus:g} and the data pipeline needs ~{DATA_CPU_RESERVE} more: lower one of them"
        )
    threads = plan_threads(config, use_gpu, tokenized_up_front, runtime.largest_node_cpus() or cpus)
    return ResourcePlan(use_gpu, DataResources.for_cluster(cpus - needed), threads, tokenized_up_front, cpus, gpus)
