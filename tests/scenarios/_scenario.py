"""What the scenario scripts share: environment, a tiny model, a small dataset, a local
multi-node Ray cluster, where Ray Train put its workers, and the one result line.

The scenarios run as their own processes (tests/test_multinode.py starts them): a process
joins one Ray cluster only, and the pytest process already holds the session-wide Ray.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

RESULT_PREFIX = "SCENARIO_RESULT "
REPO = Path(__file__).resolve().parents[2]


def setup_environment() -> None:
    """Before Ray is imported: offline, quiet, and no token auth on the throwaway cluster.

    RAY_AUTH_MODE is set explicitly: with it unset, a driver that finds ~/.ray/auth_token
    (left by any earlier local `ray.init()`) turns token auth on and cannot talk to
    nodes that were started without it.
    """
    os.environ.update(
        {
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # the local SQLite store under the scenario's storage, never a server from the environment
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "PLATFORM_STORAGE"):
        os.environ.pop(name, None)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def build_tiny_model(folder: Path) -> str:
    """The tests' tiny random BERT (tests/tiny_model.py)."""
    from tests.tiny_model import build_tiny_model as build

    return build(folder)


def prepare_sample(storage: Path, train_per_label: int = 150, test_per_label: int = 50):
    """A small sample corpus through the real prepare path; returns the manifest."""
    from pipelines.data.prepare import prepare_dataset
    from pipelines.data.sample_corpus import write_sample_corpus
    from pipelines.data.settings import PrepareConfig

    raw = write_sample_corpus(storage / "raw", train_per_label=train_per_label, test_per_label=test_per_label, seed=3)
    config = PrepareConfig(source=str(raw), storage=str(storage), rows_per_shard=64, progress=False)
    return prepare_dataset(config).manifest


def start_cluster(head_cpus: int, worker_cpus: list[int]):
    """A head and worker nodes, each its own raylet, on this machine; the driver joins it.

    Returns (cluster, head node, [worker nodes]).
    """
    import ray
    from ray.cluster_utils import Cluster

    from pipelines.core.ports import free_port

    # fixed ports would collide with other Ray clusters on this machine (tests run in parallel)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": head_cpus,
            "include_dashboard": True,  # the State API (where did the workers run?) needs it
            "dashboard_port": free_port(),
            "object_store_memory": 200 * 1024**2,
        },
    )
    workers = [cluster.add_node(num_cpus=cpus, object_store_memory=200 * 1024**2) for cpus in worker_cpus]
    cluster.wait_for_nodes()
    from pipelines.cluster.worker_env import worker_env

    # Ray's State API (Ray Train's placement-group cleaner uses it inside the cluster) finds
    # "the latest cluster on this machine" unless RAY_ADDRESS names one: other Ray clusters
    # may run beside this one, so name it, for this process and every worker of the job
    os.environ["RAY_ADDRESS"] = cluster.address
    ray.init(address=cluster.address, runtime_env={"env_vars": {**worker_env(), "RAY_ADDRESS": cluster.address}}, log_to_driver=True)
    return cluster, cluster.head_node, workers


def train_worker_placements() -> list[dict]:
    """Every Ray Train worker actor of this cluster so far (alive or dead) and its node."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=os.environ["RAY_ADDRESS"], filters=[("class_name", "=", "RayTrainWorker")], limit=1000, raise_on_missing_output=False
    )
    return [{"actor_id": a.actor_id, "node_id": a.node_id, "state": a.state} for a in actors]


def wait_for(predicate, timeout_s: float, interval_s: float = 0.2, what: str = "a condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def emit(result: dict) -> None:
    """The one line the test parses (everything else on stdout is Ray's and training's log)."""
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
