"""pipelines.core.ray_metrics: gauges that stay exported, counters that start at 0, batched steps.

The refresh logic is tested with fakes; one lane job (tests/scenarios/kept_gauge_probe.py, ~7 s)
checks against a real local Ray that a gauge set once leaves the export and a KeptGauge stays.
"""

from __future__ import annotations

import json
import sys
import threading

import pytest
from lane import lane_result, run_process  # tests/ is on sys.path under pytest

from pipelines.core import ray_metrics
from pipelines.core.ray_metrics import BatchedCounter, KeptGauge, _Keeper, start_at_zero

pytestmark = pytest.mark.timeout(60)


class FakeGauge:
    def __init__(self):
        self.sets: list[tuple[float, dict | None]] = []
        self.lock = threading.Lock()

    def set(self, value, tags=None):
        with self.lock:
            self.sets.append((value, tags))


class FakeCounter:
    def __init__(self):
        self.records: list[tuple[float, dict | None]] = []
        self.incs: list[tuple[float, dict | None]] = []

    def _record(self, value, tags=None):
        self.records.append((value, tags))

    def inc(self, value=1.0, tags=None):
        assert value > 0, "Ray's Counter.inc refuses 0"
        self.incs.append((value, tags))


def test_a_kept_gauge_is_set_again_until_forgotten():
    keeper = _Keeper(interval_s=3600)  # refreshed by hand below, not by the thread's timer
    gauge = FakeGauge()
    kept = KeptGauge(gauge, keeper)
    kept.set(3.0, tags={"model_name": "m"})
    kept.set(4.0, tags={"model_name": "m"})  # the last value per tag set is what is re-set
    kept.set(1.0, tags={"model_name": "other"})
    assert keeper.refresh() == 2
    assert sorted(gauge.sets[-2:], key=lambda s: s[0]) == [(1.0, {"model_name": "other"}), (4.0, {"model_name": "m"})]
    kept.forget({"model_name": "other"})
    gauge.sets.clear()
    keeper.refresh()
    assert gauge.sets == [(4.0, {"model_name": "m"})]


def test_the_keeper_thread_refreshes_within_its_interval():
    keeper = _Keeper(interval_s=0.05)
    gauge = FakeGauge()
    KeptGauge(gauge, keeper).set(7.0)
    done = threading.Event()
    for _ in range(100):  # up to 2 s on a loaded machine; typically 0.1 s
        if len(gauge.sets) >= 3:
            done.set()
            break
        threading.Event().wait(0.02)
    assert done.is_set(), gauge.sets
    assert all(value == 7.0 for value, _ in gauge.sets)


def test_the_refresh_interval_is_half_of_rays_report_interval(monkeypatch):
    monkeypatch.setattr(ray_metrics, "_keeper", None)
    monkeypatch.setattr(ray_metrics, "report_interval_s", lambda: 10.0)
    assert ray_metrics.keeper().interval_s == 5.0  # every 10 s export carries a fresh set


def test_a_gauge_that_raises_does_not_stop_the_others():
    class Broken:
        def set(self, value, tags=None):
            raise RuntimeError("metrics agent gone")

    keeper = _Keeper(interval_s=3600)
    good = FakeGauge()
    KeptGauge(Broken(), keeper)._k().keep(Broken(), 1.0, None)
    KeptGauge(good, keeper).set(2.0)
    keeper.refresh()
    assert good.sets[-1] == (2.0, None)


def test_counters_start_at_zero_and_steps_flush_every_few_seconds():
    now = [100.0]
    counter = FakeCounter()
    steps = BatchedCounter(counter, tags={"ray_train_run_name": "r"}, flush_every_s=5.0, clock=lambda: now[0])
    assert counter.records == [(0.0, {"ray_train_run_name": "r"})]  # exported before the first step
    for _ in range(40):  # 40 steps in 4 s: no Ray call yet
        steps.add()
        now[0] += 0.1
    assert counter.incs == []
    now[0] += 1.5  # past 5 s since the last flush
    steps.add()
    assert counter.incs == [(41.0, {"ray_train_run_name": "r"})]
    steps.flush()  # nothing pending: no inc(0), which Ray refuses
    steps.add()
    steps.flush()
    assert counter.incs[-1] == (1.0, {"ray_train_run_name": "r"})


def test_rays_counter_still_has_the_private_record_that_start_at_zero_uses():
    from ray.serve.metrics import Counter as ServeCounter
    from ray.util.metrics import Counter

    for cls in (Counter, ServeCounter):
        assert callable(getattr(cls, "_record", None)), f"{cls}: start_at_zero needs Metric._record (Ray 2.60)"
    start_at_zero(object())  # a Ray without it: a warning, no crash


# --- against a real Ray ---------------------------------------------------------------------

def kept_gauge_scrape(workdir, env) -> dict:
    from pipelines.core.ports import free_port

    code, output = run_process(
        [sys.executable, "tests/scenarios/kept_gauge_probe.py", str(free_port())], env, workdir / "probe.log", timeout_s=60
    )
    assert code == 0, output[-3000:]
    return json.loads(output.strip().splitlines()[-1])


@pytest.mark.lane(kept_gauge_scrape, timeout_s=60, light=True)
def test_ray_drops_a_gauge_set_once_and_keeps_a_kept_gauge(request):
    result = lane_result(request, kept_gauge_scrape)
    assert result["seen"] == {"probe_plain_gauge": True, "probe_kept_gauge": True, "probe_zero_counter_total": True}, result
    # the plain gauge came and went (Ray's agent keeps a gauge two report intervals); ours stayed,
    # and the counter is exported at 0 before any increment
    assert result["at_end"] == {"probe_plain_gauge": False, "probe_kept_gauge": True, "probe_zero_counter_total": True}, result
