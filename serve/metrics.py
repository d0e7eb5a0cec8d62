"""Our Prometheus metrics, beside Serve's own (ray_serve_num_http_requests_total, latency, batching).

Built with `ray.serve.metrics`, which adds the deployment, replica and application tags;
Ray exports them with a `ray_` prefix (and `_total` on counters) on each node's metrics
port, which Prometheus scrapes. `ServingMetrics` lives in each replica (updated once per
batch, and per refused request); `ProxyRetryMetrics` in Serve's HTTP proxy on each node
(serve/proxy_retry.py: requests sent again because the replica running them died), built
with `ray.util.metrics` since the proxy is no Serve replica (no deployment tags).

| exported as | type | tags | what it answers |
|---|---|---|---|
| ray_imdb_predictions_total | counter | label, model_version | what the model says, and how often |
| ray_imdb_batch_size | histogram | | texts per forward pass: is batching working? |
| ray_imdb_inference_latency_ms | histogram | | tokenize + forward time per batch |
| ray_imdb_model_version | gauge, kept | model_name | the version each replica serves now (rollouts) |
| ray_imdb_model_swaps_total | counter | model_name | how many hot swaps happened |
| ray_imdb_registry_errors_total | counter, from 0 | | failed registry checks or loads (the old model keeps serving) |
| ray_imdb_rejected_requests_total | counter | reason | bad input, auth failures, oversize bodies, model unavailable |
| ray_imdb_request_retries_total | counter | outcome | requests Serve's proxy sent again because the replica running them died (answered / gave_up) |

Kept: Ray 2.60 drops a gauge from the export ~30 s after it was last set, and the version is
set only when it changes; the replica re-sets it every few seconds (pipelines.core.ray_metrics).
From 0: exported at 0 when the replica starts, so that `increase()` counts the first error.
"""

from __future__ import annotations

from collections import Counter as Tally

from ray.serve.metrics import Counter, Gauge, Histogram
from ray.util import metrics as ray_metrics

from pipelines.core.ray_metrics import KeptGauge, start_at_zero

BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128]
LATENCY_BUCKETS_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000]


class ServingMetrics:
    def __init__(self) -> None:
        self.predictions = Counter(
            "imdb_predictions", description="Predictions returned, by label and model version.", tag_keys=("label", "model_version")
        )
        self.batch_size = Histogram("imdb_batch_size", description="Texts per model forward pass.", boundaries=BATCH_SIZE_BUCKETS)
        self.inference_ms = Histogram(
            "imdb_inference_latency_ms", description="Tokenization + forward time per batch (ms).", boundaries=LATENCY_BUCKETS_MS
        )
        self.model_version = KeptGauge(
            Gauge("imdb_model_version", description="Registered model version this replica serves.", tag_keys=("model_name",))
        )
        self._model_name: str | None = None
        self.swaps = Counter("imdb_model_swaps", description="Hot swaps to another model version.", tag_keys=("model_name",))
        self.registry_errors = Counter("imdb_registry_errors", description="Failed registry checks or model loads.")
        start_at_zero(self.registry_errors)
        self.rejected = Counter("imdb_rejected_requests", description="Requests refused, by reason.", tag_keys=("reason",))

    def record_rejection(self, reason: str) -> None:
        self.rejected.inc(tags={"reason": reason})

    def record_batch(self, predictions: list[dict], seconds: float) -> None:
        self.batch_size.observe(len(predictions))
        self.inference_ms.observe(seconds * 1000.0)
        for (label, version), count in Tally((p["label"], p["model_version"]) for p in predictions).items():
            self.predictions.inc(count, tags={"label": label, "model_version": version})

    def record_model(self, name: str, version: str, swapped: bool) -> None:
        if self._model_name not in (None, name):
            self.model_version.forget({"model_name": self._model_name})
        self._model_name = name
        self.model_version.set(float(version), tags={"model_name": name})
        if swapped:
            self.swaps.inc(tags={"model_name": name})


class ProxyRetryMetrics:
    def __init__(self) -> None:
        self.retries = ray_metrics.Counter(
            "imdb_request_retries",
            description="Requests Serve's HTTP proxy sent again because the replica running them died, by outcome.",
            tag_keys=("outcome",),
        )

    def record(self, outcome: str) -> None:
        self.retries.inc(tags={"outcome": outcome})
