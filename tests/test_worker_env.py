"""What our Ray workers get in their environment: a task or actor that asks for no GPU sees none.

Ray 2.60 leaves a worker assigned zero GPUs with the node's CUDA_VISIBLE_DEVICES
(ray/_private/accelerators/accelerator.py); on a GPU node a CPU Serve replica or batch
actor would then run ONNX Runtime's CUDA provider, or torch, on a GPU a training worker
holds. The local Ray of the tests (started like every command's, pipelines.cluster.runtime)
has no GPU, so "sees none" reads as CUDA_VISIBLE_DEVICES set to "", not unset.
"""

from __future__ import annotations

import os

import pytest
import ray

pytestmark = pytest.mark.timeout(120)


@ray.remote(num_cpus=0.1, num_gpus=0)
def visible_gpus_of_a_task() -> str | None:
    return os.environ.get("CUDA_VISIBLE_DEVICES")


@ray.remote(num_cpus=0.1, num_gpus=0)
class CpuActor:
    def __init__(self, guarded: bool):
        self.before = os.environ.get("CUDA_VISIBLE_DEVICES")
        if guarded:
            from pipelines.cluster.worker_env import hide_gpus_unless_assigned

            hide_gpus_unless_assigned()

    def visible_gpus(self) -> tuple[str | None, str | None]:
        return self.before, os.environ.get("CUDA_VISIBLE_DEVICES")


def test_tasks_and_actors_without_a_gpu_see_none(ray_session):
    assert ray.get(visible_gpus_of_a_task.remote()) == ""
    actor = CpuActor.remote(guarded=False)
    assert ray.get(actor.visible_gpus.remote()) == ("", "")
    ray.kill(actor)


def test_an_actor_started_without_our_worker_env_hides_the_nodes_gpus_itself(ray_session):
    """As a Serve replica that `serve deploy` started from a config file: Ray's switch off, the node's list in its environment."""
    node_like = {"env_vars": {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "CUDA_VISIBLE_DEVICES": "0"}}
    bare = CpuActor.options(runtime_env=node_like).remote(guarded=False)
    guarded = CpuActor.options(runtime_env=node_like).remote(guarded=True)
    try:
        assert ray.get(bare.visible_gpus.remote()) == ("0", "0"), "Ray now hides GPUs from zero-GPU actors itself: the guard may go"
        assert ray.get(guarded.visible_gpus.remote()) == ("0", "")
    finally:
        ray.kill(bare)
        ray.kill(guarded)


def test_the_guard_leaves_the_driver_alone(ray_session, monkeypatch):
    from pipelines.cluster.worker_env import hide_gpus_unless_assigned

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    hide_gpus_unless_assigned()  # the driver is no actor: it may hold the machine's GPUs
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
