"""Does a gauge stay in Ray's metrics export? Run by tests/test_ray_metrics.py in a process of its own.

    python tests/scenarios/kept_gauge_probe.py PORT

A local Ray (127.0.0.1, its metrics export on PORT) whose processes report metrics every
second (RAY_metrics_report_interval_ms=1000; the default is 10 s, and the node's agent keeps a
gauge for two intervals). An actor sets a plain gauge and a KeptGauge once, and starts a counter
at 0; the node's /metrics is then scraped every 0.25 s until the plain gauge has come and gone
(or 15 s). Prints one JSON line: for each metric, whether it was seen, and whether it was still
there at the end.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ["RAY_metrics_report_interval_ms"] = "1000"
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

NAMES = ("probe_plain_gauge", "probe_kept_gauge", "probe_zero_counter_total")


def scrape(port: int) -> dict[str, bool]:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {name: bool(re.search(rf"^ray_{name}(\{{[^}}]*\}})? ", body, re.MULTILINE)) for name in NAMES}


def main(port: int) -> None:
    import ray

    ray.init(num_cpus=1, include_dashboard=False, _metrics_export_port=port, _node_ip_address="127.0.0.1",
             _temp_dir=tempfile.mkdtemp(prefix="kept-gauge-"), log_to_driver=False)

    @ray.remote(num_cpus=0)
    class Setter:
        def set_once(self) -> None:
            from ray.util.metrics import Counter, Gauge

            from pipelines.core.ray_metrics import KeptGauge, start_at_zero

            self.plain = Gauge("probe_plain_gauge", description="set once")
            self.kept = KeptGauge(Gauge("probe_kept_gauge", description="set once, kept"))
            self.counter = Counter("probe_zero_counter", description="started at 0")
            self.plain.set(1.0)
            self.kept.set(2.0)
            start_at_zero(self.counter)

    try:
        setter = Setter.remote()
        ray.get(setter.set_once.remote())
        seen = dict.fromkeys(NAMES, False)
        start = time.monotonic()
        while time.monotonic() - start < 15:
            now = scrape(port)
            seen = {name: seen[name] or now[name] for name in NAMES}
            if seen["probe_plain_gauge"] and not now["probe_plain_gauge"]:
                break
            time.sleep(0.25)
        print(json.dumps({"seen": seen, "at_end": now, "after_s": round(time.monotonic() - start, 1)}), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]))
