"""Prometheus for the cluster rehearsal: the shipped config, what must have series, what fired.

- `render_config(folder, ...)`: a copy of platform/monitoring/prometheus.yml and alerts.yml in
  which only the intervals change (a rehearsal's training run lasts a minute, not an hour);
  the scrape jobs, the service-discovery path and the rules are the shipped ones.
- `used_metrics()`: every metric an alert of alerts.yml or a panel of the Grafana dashboard
  queries, split into those a CPU cluster must show and those it cannot (`NOT_ON_THIS_CLUSTER`).
- `Prometheus`: a client of its HTTP API (series over a time range, the alerts).

Debian's `prometheus` package has the server (`make promtool` installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "platform" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "imdb-platform.json"

# Metrics a CPU-only Ray cluster on machines we own cannot have, and what tests them instead.
NOT_ON_THIS_CLUSTER = {
    r"DCGM_\w+": "GPU nodes only (NVIDIA's DCGM exporter): the GPU alerts' promtool unit tests (platform/monitoring/alerts_test.yml)",
    r"ray_node_gpus_utilization|ray_node_gram_\w+": "GPU nodes only (Ray's reporter exports them where it finds GPUs): alerts_test.yml (GpuIdleWhileTraining)",
    r"kubelet_volume_stats_\w+": "Kubernetes only (the kubelet's volume stats of KubeRay's MLflow volume): alerts_test.yml (MlflowStoreVolumeFilling)",
    r"ray_memory_manager_worker_eviction_total": "only once Ray's memory monitor kills a worker (out of memory): alerts_test.yml (WorkersKilledForMemory)",
    r"ray_imdb_request_retries_total": "only once a model replica dies with requests in flight: tests/test_multinode.py::test_killing_a_serve_replica_or_the_proxy_under_load_loses_only_what_the_proxy_held",
}
METRIC = re.compile(r"\b(ray_[a-z0-9_]+|DCGM_[A-Z0-9_]+|kubelet_[a-z0-9_]+)\b")
# label matchers and the label lists of by/on/without/ignoring/group_*: names there are labels
LABELS = re.compile(r"\{[^}]*\}|\b(?:by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)")


def render_config(folder: Path, scrape_interval: str, evaluation_interval: str) -> Path:
    """prometheus.yml and its rule files copied to `folder`, with the two intervals changed."""
    folder.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    config["global"].update(scrape_interval=scrape_interval, evaluation_interval=evaluation_interval)
    for rule_file in config["rule_files"]:
        shutil.copy(MONITORING / rule_file, folder / rule_file)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _expressions() -> dict[str, list[str]]:
    """Where each expression comes from -> expressions."""
    groups = yaml.safe_load((MONITORING / "alerts.yml").read_text())["groups"]
    found = {f"alert {rule['alert']}": [rule["expr"]] for group in groups for rule in group["rules"]}

    def panels(items):
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        exprs = [t["expr"] for t in panel.get("targets", []) if t.get("expr")]
        if exprs:
            found.setdefault(f"panel {panel['title']}", []).extend(exprs)
    return found


def used_metrics() -> tuple[dict[str, list[str]], dict[str, str]]:
    """(metric -> the alerts and panels that use it, for those this cluster must show;
    metric -> why not and what tests it, for the others)."""
    must, cannot = {}, {}
    for where, exprs in _expressions().items():
        for name in {m for expr in exprs for m in METRIC.findall(LABELS.sub(" ", expr))}:
            reason = next((why for pattern, why in NOT_ON_THIS_CLUSTER.items() if re.fullmatch(pattern, name)), None)
            if reason:
                cannot[name] = reason
            else:
                must.setdefault(name, []).append(where)
    return must, cannot


class Prometheus:
    """The HTTP API of a running Prometheus."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=15) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {body}")
        return body["data"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=3) as response:
                return response.status == 200
        except OSError:
            return False

    def series_count(self, metric: str, start: float) -> int:
        """Series of `metric` that had a sample since `start` (unix time): gauges Ray dropped count too."""
        return len(self._get("/api/v1/series", **{"match[]": metric, "start": f"{start:.3f}"}))

    def targets_up(self, job: str) -> list[str]:
        targets = self._get("/api/v1/targets", state="active")["activeTargets"]
        return sorted(t["labels"]["instance"] for t in targets if t["labels"].get("job") == job and t["health"] == "up")

    def target_jobs(self, scrape_pool: str) -> set[str]:
        """The `job` labels of a scrape job's targets, up or down."""
        targets = self._get("/api/v1/targets", state="active")["activeTargets"]
        return {t["labels"].get("job", "") for t in targets if t.get("scrapePool") == scrape_pool}

    def firing(self, alert: str) -> list[dict]:
        return [a for a in self._get("/api/v1/alerts")["alerts"] if a["labels"].get("alertname") == alert and a["state"] == "firing"]
