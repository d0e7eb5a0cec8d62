"""What a job asks of the autoscaler, and that it takes the request back.

The autoscaler itself only exists on `ray up` / KubeRay clusters; here Ray's
`request_resources` is replaced by a recorder, and the cluster's resources by numbers,
so the decisions are checked exactly: which bundles are asked for, how long the job
waits, and that the request is withdrawn (an empty request) however the job ends.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from pipelines.cluster import autoscaler as cluster_autoscaler
from pipelines.cluster import runtime
from pipelines.training import resources
from pipelines.training.settings import TrainConfig

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def autoscaler(monkeypatch):
    """Records request_resources calls; the cluster grows to what was asked on the first poll."""
    import ray.autoscaler.sdk

    calls: list[list[dict]] = []
    cluster = {"CPU": 1.0, "GPU": 0.0, "max_gpus": None}

    def request_resources(num_cpus=None, bundles=None):
        calls.append(list(bundles or []))

    monkeypatch.setattr(ray.autoscaler.sdk, "request_resources", request_resources)
    monkeypatch.setattr(runtime, "cluster_cpus", lambda: cluster["CPU"])
    monkeypatch.setattr(runtime, "cluster_gpus", lambda: cluster["GPU"])
    monkeypatch.setattr(runtime, "largest_node_cpus", lambda: cluster["CPU"])
    monkeypatch.setattr(cluster_autoscaler, "autoscaler_max_gpus", lambda: cluster["max_gpus"])
    monkeypatch.setattr(runtime, "is_local_cluster", lambda: False)
    # the autoscaler module's clock only: `time.sleep` itself is every thread's (tests/lane.py waits on other threads)
    def grow(seconds: float) -> None:
        cluster.update(CPU=cluster["CPU"] + 4, GPU=cluster["GPU"] + 2)

    monkeypatch.setattr(cluster_autoscaler, "time", SimpleNamespace(monotonic=time.monotonic, sleep=grow))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("PLATFORM_RESOURCE_WAIT_S", "60")
    return calls, cluster


def test_the_request_is_withdrawn_after_success_failure_and_ctrl_c(autoscaler):
    calls, _ = autoscaler
    config = TrainConfig(num_workers=2, batch_size=16, use_gpu="no")
    with resources.requested_resources(config):
        assert calls == [[{"CPU": 1.0}, {"CPU": 1.0}]]
    assert calls[-1] == [], "not withdrawn after success"

    for error in (RuntimeError("training failed"), KeyboardInterrupt()):
        calls.clear()
        with pytest.raises(type(error)):
            with resources.requested_resources(config):
                raise error
        assert calls[-1] == [], f"not withdrawn after {type(error).__name__}"


def test_use_gpu_auto_asks_for_gpus_when_the_node_types_have_them_and_waits_for_them(autoscaler):
    calls, cluster = autoscaler
    cluster["max_gpus"] = 8.0  # GPU node types scaled to 0 right now
    config = TrainConfig(num_workers=2, batch_size=16, use_gpu="auto")
    with resources.requested_resources(config):
        assert calls[0] == [{"CPU": 1.0, "GPU": 1}, {"CPU": 1.0, "GPU": 1}]
        assert runtime.cluster_gpus() >= 2, "went on before the GPU nodes came up"
        use_gpu = resources.plan_resources(config, tokenized_up_front=False).use_gpu
    assert use_gpu, "--use-gpu auto trained on CPUs although GPU nodes came up"


def test_use_gpu_auto_stays_on_cpus_when_no_node_type_has_gpus(autoscaler):
    calls, cluster = autoscaler
    cluster["max_gpus"] = 0.0
    with resources.requested_resources(TrainConfig(num_workers=1, batch_size=8, use_gpu="auto")):
        assert calls[0] == [{"CPU": 1.0}]


def test_use_gpu_auto_fails_when_the_gpus_it_waited_for_never_came_unless_cpu_fallback_is_asked(autoscaler, monkeypatch):
    from pipelines.core.errors import ConfigError

    calls, cluster = autoscaler
    cluster["max_gpus"] = 8.0
    monkeypatch.setenv("PLATFORM_RESOURCE_WAIT_S", "0")
    monkeypatch.setattr(cluster_autoscaler.time, "sleep", lambda s: None)  # the GPU nodes never come
    config = TrainConfig(num_workers=2, batch_size=16, use_gpu="auto")
    with resources.requested_resources(config):
        with pytest.raises(ConfigError, match=r"--use-gpu auto: the cluster can add 8 GPUs but has 0 after waiting 0 s for 2; .*--cpu-fallback"):
            resources.plan_resources(config, tokenized_up_front=False)
    fallback = TrainConfig(num_workers=2, batch_size=16, use_gpu="auto", cpu_fallback=True)
    cluster["CPU"] = 8.0
    with resources.requested_resources(fallback):
        assert not resources.plan_resources(fallback, tokenized_up_front=False).use_gpu


def test_the_wait_is_bounded(autoscaler, monkeypatch, caplog):
    calls, cluster = autoscaler
    monkeypatch.setenv("PLATFORM_RESOURCE_WAIT_S", "0")
    monkeypatch.setattr(cluster_autoscaler.time, "sleep", lambda s: None)  # the cluster never grows (the module's clock: see the fixture)
    with resources.requested_resources(TrainConfig(num_workers=4, batch_size=16, use_gpu="yes")):
        pass
    assert "did not provide" in caplog.text
    assert calls[-1] == []


def test_a_local_cluster_asks_nothing(autoscaler, monkeypatch):
    calls, _ = autoscaler
    monkeypatch.setattr(runtime, "is_local_cluster", lambda: True)
    with resources.requested_resources(TrainConfig()):
        pass
    assert calls == []
