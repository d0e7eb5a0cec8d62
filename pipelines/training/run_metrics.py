"""Prometheus metrics of a training run, beside Ray Train's own (`ray_train_*`).

Ray Train's controller state is a gauge set on transitions: RESTARTING lasts one controller
loop iteration and RUNNING vanishes from the export ~30 s after it was set
(pipelines.core.ray_metrics). These stay, and carry Ray Train's `ray_train_run_name` label:

| exported as | type | set by | what it answers |
|---|---|---|---|
| ray_imdb_train_steps_total | counter | rank 0, flushed every few s | is the run making progress? |
| ray_imdb_train_worker_active | gauge, kept | every worker, while it trains | which run trains on which node and GPU (`instance`, `GpuIndex`) |
| ray_imdb_train_worker_failures_total | counter | the Train controller (pipelines/tracking/callbacks.py) | worker group failures (each restarts the group while max_failures allows) |
"""

from __future__ import annotations

from pipelines.core.ray_metrics import BatchedCounter, KeptGauge

RUN_TAG = "ray_train_run_name"  # Ray Train's own label: our series join with ray_train_*


class WorkerMetrics:
    """One Train worker's metrics: `active` while `train_loop_per_worker` runs; rank 0 counts steps."""

    def __init__(self, run_name: str, rank: int, gpu_index: str | None):
        from ray.util.metrics import Counter, Gauge

        self.active_tags = {RUN_TAG: run_name, "ray_train_worker_world_rank": str(rank), "GpuIndex": gpu_index or "none"}
        self.active = KeptGauge(Gauge(
            "imdb_train_worker_active",
            description="1 while this Train worker runs its training loop; GpuIndex: its GPU (Ray's node GPU label).",
            tag_keys=tuple(self.active_tags),
        ))
        self.active.set(1.0, tags=self.active_tags)
        self.steps = None
        if rank == 0:
            counter = Counter("imdb_train_steps", description="Optimizer steps done (rank 0).", tag_keys=(RUN_TAG,))
            self.steps = BatchedCounter(counter, tags={RUN_TAG: run_name})  # exported at 0 from the start

    @classmethod
    def for_this_worker(cls) -> WorkerMetrics:
        import ray
        import ray.train

        context = ray.train.get_context()
        gpus = ray.get_gpu_ids()
        return cls(context.get_experiment_name(), context.get_world_rank(), str(gpus[0]) if gpus else None)

    def step_done(self) -> None:
        if self.steps is not None:
            self.steps.add(1)

    def flush(self) -> None:
        if self.steps is not None:
            self.steps.flush()

    def close(self) -> None:
        self.flush()
        self.active.gauge.set(0.0, tags=self.active_tags)
        self.active.forget(self.active_tags)

