"""Ray metrics that stay exported: gauges re-set before Ray drops them, counters that start at 0.

Measured on Ray 2.60 (a `ray.util.metrics.Gauge` set once in an actor, the node's metrics
port scraped every few seconds): the value is exported from the first report (~10 s) and
gone ~30 s after it was set. A worker reports a gauge only in the report interval it was set
in (`metrics_report_interval_ms`, 10 s), and the node's metrics agent keeps a gauge for two
intervals after it last heard of it. Counters stay. So a gauge set only on a change (the
model version a replica serves, "this worker is training") vanishes between changes, and
an alert with `for:` longer than ~20 s on it can never fire.

- `KeptGauge`: remembers its last value per tag set and re-sets it every half report
  interval from one daemon thread per process, until `forget`.
- `start_at_zero`: exports a counter's series at 0 before its first increment, so that
  `increase()` sees the first one (without a 0 sample it starts from the first value it sees).
- `BatchedCounter`: counts locally per step and adds to the Ray counter at most every few
  seconds (a Ray metric call per training step would cost more than the count).
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)

DEFAULT_REPORT_INTERVAL_S = 10.0  # Ray's metrics_report_interval_ms default
FLUSH_EVERY_S = 5.0


def report_interval_s() -> float:
    """How often this process's metrics reach the node's agent (RAY_metrics_report_interval_ms)."""
    try:
        import ray

        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0
    except Exception:  # noqa: BLE001 - not in a Ray process, or a Ray without the private config
        return DEFAULT_REPORT_INTERVAL_S


def _tag_key(tags: dict[str, str] | None) -> tuple:
    return tuple(sorted((tags or {}).items()))


class _Keeper:
    """One daemon thread per process that re-sets every kept gauge's values."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self._values: dict[tuple[int, tuple], tuple[object, float, dict | None]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def keep(self, gauge, value: float, tags: dict | None) -> None:
        with self._lock:
            self._values[(id(gauge), _tag_key(tags))] = (gauge, value, tags)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kept-gauges", daemon=True)
                self._thread.start()

    def forget(self, gauge, tags: dict | None) -> None:
        with self._lock:
            self._values.pop((id(gauge), _tag_key(tags)), None)

    def refresh(self) -> int:
        with self._lock:
            held = list(self._values.values())
        for gauge, value, tags in held:
            try:
                gauge.set(value, tags=tags)
            except Exception as exc:  # noqa: BLE001 - a metric must never take the process down
                log.debug("could not re-set a gauge: %s", exc)
        return len(held)

    def _run(self) -> None:
        while not self._wake.wait(self.interval_s):
            self.refresh()


_keeper: _Keeper | None = None
_keeper_lock = threading.Lock()


def keeper() -> _Keeper:
    global _keeper
    with _keeper_lock:
        if _keeper is None:
            # every export must carry the value: re-set twice per report interval
            _keeper = _Keeper(report_interval_s() / 2)
        return _keeper


class KeptGauge:
    """A Ray gauge (ray.util.metrics or ray.serve.metrics) whose last value per tag set stays exported."""

    def __init__(self, gauge, keeper_: _Keeper | None = None):
        self.gauge = gauge
        self._keeper = keeper_

    def _k(self) -> _Keeper:
        return self._keeper or keeper()

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.gauge.set(value, tags=tags)
        self._k().keep(self.gauge, value, tags)

    def forget(self, tags: dict[str, str] | None = None) -> None:
        """Stop re-setting this tag set: Ray drops it from the export ~2 report intervals later."""
        self._k().forget(self.gauge, tags)


def start_at_zero(counter, tags: dict[str, str] | None = None) -> None:
    """Export `counter`'s series for `tags` at 0 (Counter.inc refuses 0; `_record` is what inc
    calls, with the metric's default tags, e.g. Serve's deployment/replica/application)."""
    record = getattr(counter, "_record", None)
    if record is None:  # a Ray without it: the alerts' `unless ... offset` branch still sees a new series
        log.warning("cannot start %s at 0 on this Ray version", type(counter).__name__)
        return
    record(0.0, tags=tags)


class BatchedCounter:
    """Adds to a Ray counter at most every `flush_every_s`; `add` is a float add and a clock read."""

    def __init__(self, counter, tags: dict[str, str] | None = None, flush_every_s: float = FLUSH_EVERY_S,
                 clock=time.monotonic):
        self.counter, self.tags, self.flush_every_s, self.clock = counter, tags, flush_every_s, clock
        self.pending = 0.0
        self._last_flush = clock()
        start_at_zero(counter, tags)

    def add(self, value: float = 1.0) -> None:
        self.pending += value
        if self.clock() - self._last_flush >= self.flush_every_s:
            self.flush()

    def flush(self) -> None:
        self._last_flush = self.clock()
        if self.pending > 0:
            self.counter.inc(self.pending, tags=self.tags)
            self.pending = 0.0
