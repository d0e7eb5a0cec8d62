"""Multi-node training on one machine: `ray.cluster_utils.Cluster` with a head and worker nodes.

    python tests/scenarios/multinode_train.py spread     WORKDIR
    python tests/scenarios/multinode_train.py node-loss  WORKDIR

spread: a head (1 CPU) and two worker nodes (2 CPUs each). Two Train workers of 1.1 CPUs:
no node has room for two of them and the head none at all, so Ray Train's placement group
must put them on the two worker nodes. One epoch, then the model is registered.

node-loss: the same plus a spare worker node. Once the first epoch's report (and so its
checkpoint) is in, a node that runs a Train worker is killed without warning
(`Cluster.remove_node(allow_graceful=False)`: its raylet and every process on it die, as
when an instance disappears). Ray Train restarts the worker group on the remaining nodes
(max_failures), the workers resume from the last checkpoint, and the run finishes and
registers a model.

Prints one `SCENARIO_RESULT {json}` line; exits non-zero on an error.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _scenario  # noqa: E402  (the scenario folder is not a package)

CPUS_PER_WORKER = 1.1  # > half a 2-CPU worker node, > the 1-CPU head: one worker per worker node
MODEL_NAME = "tiny-multinode"


def train_config(manifest, storage: Path, model_dir: str, **overrides):
    from pipelines.training.settings import TrainConfig

    settings = dict(
        data=manifest.root.uri,
        model=model_dir,
        epochs=1,
        batch_size=16,  # 2 workers x 8
        eval_batch_size=64,
        lr=3e-3,
        warmup_ratio=0.1,
        group_by_length=False,
        max_length=64,
        num_workers=2,
        use_gpu="no",
        cpus_per_worker=CPUS_PER_WORKER,
        threads_per_worker=1,
        storage=str(storage),
        experiment="multinode",
        register_as=MODEL_NAME,
        max_failures=0,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def node_roles(head, workers) -> dict[str, str]:
    roles = {head.node_id: "head"}
    roles.update({node.node_id: f"worker-{i + 1}" for i, node in enumerate(workers)})
    return roles


class NodeKiller(threading.Thread):
    """After the first epoch's report lands, kill a node that runs a Train worker."""

    def __init__(self, cluster, workers, storage: Path, run_name: str, driver_node_id: str, timeout_s: float = 600):
        super().__init__(daemon=True, name="node-killer")
        self.cluster, self.workers, self.storage, self.run_name = cluster, workers, storage, run_name
        self.driver_node_id, self.timeout_s = driver_node_id, timeout_s
        self.removed_node_id: str | None = None
        self.removed_at_epoch: int | None = None
        self.removed_after_s: float | None = None
        self.error: str | None = None

    def _reported_epochs(self, client, run_id: str) -> int:
        # MlflowEpochLogger logs an epoch in after_report, i.e. once Ray Train has taken the
        # report and registered its checkpoint: a checkpoint we can resume from
        return max((m.step for m in client.get_metric_history(run_id, "train/loss")), default=0)

    def run(self) -> None:
        try:
            from mlflow.tracking import MlflowClient

            from pipelines.tracking.store_uri import local_store

            started = time.monotonic()
            marker = self.storage / "ray_results" / self.run_name / "mlflow_run_id"
            _scenario.wait_for(marker.exists, self.timeout_s, what=f"{marker}")
            run_id = marker.read_text().strip()
            client = MlflowClient(local_store(str(self.storage))[0])
            epoch = _scenario.wait_for(lambda: self._reported_epochs(client, run_id), self.timeout_s, 0.1, "the first epoch's report")
            alive = [p for p in _scenario.train_worker_placements() if p["state"] == "ALIVE"]
            candidates = [n for n in self.workers if n.node_id in {p["node_id"] for p in alive} and n.node_id != self.driver_node_id]
            if not candidates:
                raise RuntimeError(f"no removable node runs a Train worker: {alive}")
            victim = candidates[0]
            self.cluster.remove_node(victim, allow_graceful=False)
            self.removed_node_id, self.removed_at_epoch = victim.node_id, epoch
            self.removed_after_s = round(time.monotonic() - started, 1)
            print(f"[scenario] removed node {victim.node_id[:12]} after epoch {epoch} was reported", flush=True)
        except Exception:
            self.error = traceback.format_exc()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("spread", "node-loss"))
    parser.add_argument("workdir", type=Path)
    args = parser.parse_args(argv)
    _scenario.setup_environment()  # before Ray starts
    workdir: Path = args.workdir.resolve()
    storage = workdir / "storage"
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    manifest = _scenario.prepare_sample(storage)
    model_dir = _scenario.build_tiny_model(workdir / "tiny-bert")
    timings["prepare_s"] = round(time.monotonic() - t0, 1)

    import ray

    from pipelines.training.job import run_training

    worker_cpus = [2, 2] if args.mode == "spread" else [2, 2, 2]  # node-loss: one spare
    cluster, head, workers = _scenario.start_cluster(head_cpus=1, worker_cpus=worker_cpus)
    timings["cluster_start_s"] = round(time.monotonic() - t0 - timings["prepare_s"], 1)
    roles = node_roles(head, workers)
    driver_node_id = ray.get_runtime_context().get_node_id()
    result: dict = {"mode": args.mode, "roles": roles, "driver_node": roles.get(driver_node_id, driver_node_id)}
    killer = None
    try:
        if args.mode == "spread":
            config = train_config(manifest, storage, model_dir, run_name="spread")
        else:
            config = train_config(manifest, storage, model_dir, run_name="node-loss", epochs=2, max_failures=2)
            killer = NodeKiller(cluster, workers, storage, config.run_name, driver_node_id)
            killer.start()
        train_start = time.monotonic()
        outcome = run_training(config)
        timings["train_s"] = round(time.monotonic() - train_start, 1)
        placements = _scenario.train_worker_placements()
        result.update(
            registered_version=outcome.registered_version,
            registered_model=MODEL_NAME,
            tracking_uri=outcome.tracking_uri,
            run_id=outcome.run_id,
            epochs_trained=outcome.metrics.get("epochs_trained"),
            test_rows=outcome.metrics.get("test/rows"),
            train_metrics={k: v for k, v in outcome.metrics.items() if k.startswith("train/")},
            expected_test_rows=manifest.splits["test"].rows,
            train_workers=[{**p, "role": roles.get(p["node_id"], "?")} for p in placements],
        )
        if killer is not None:
            killer.join(timeout=5)
            result.update(
                removed_node=roles.get(killer.removed_node_id) if killer.removed_node_id else None,
                removed_at_epoch=killer.removed_at_epoch,
                removed_after_s=killer.removed_after_s,
                killer_error=killer.error,
            )
    finally:
        timings["total_s"] = round(time.monotonic() - t0, 1)
        result["timings"] = timings
        ray.shutdown()
        cluster.shutdown()
    _scenario.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
