"""Multi-node training on one machine: `ray.cluster_utils.Cluster` with a head and worker nodes.

    python tests/scenarios/multinode_train.py WORKDIR

A head (1 CPU) and two worker nodes (2 CPUs each). Two Train workers of 1.1 CPUs: no node
has room for two of them and the head none at all, so Ray Train's placement group must put
them on the two worker nodes. One epoch, then the model is registered.

Losing a node mid-run (killed, then resumed from the checkpoint in object storage) is the
cluster rehearsal's (cluster_rehearsal.py): it kills a worker node of a real `ray start`
cluster, so a second cluster here for the same check would only cost minutes.

Prints one `SCENARIO_RESULT {json}` line; exits non-zero on an error.
"""

from __future__ import annotations

import argparse
import sys
import time
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
        onnx_variants=False,
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def node_roles(head, workers) -> dict[str, str]:
    roles = {head.node_id: "head"}
    roles.update({node.node_id: f"worker-{i + 1}" for i, node in enumerate(workers)})
    return roles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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

    cluster, head, workers = _scenario.start_cluster(head_cpus=1, worker_cpus=[2, 2])
    timings["cluster_start_s"] = round(time.monotonic() - t0 - timings["prepare_s"], 1)
    roles = node_roles(head, workers)
    driver_node_id = ray.get_runtime_context().get_node_id()
    result: dict = {"roles": roles, "driver_node": roles.get(driver_node_id, driver_node_id)}
    try:
        config = train_config(manifest, storage, model_dir, run_name="spread")
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
    finally:
        timings["total_s"] = round(time.monotonic() - t0, 1)
        result["timings"] = timings
        ray.shutdown()
        cluster.shutdown()
    _scenario.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
