"""Kill -9 a model replica under steady load; a plain client must see no failed request.

    python tests/scenarios/serve_replica_kill.py WORKDIR [--clients 8] [--retries 0]

A tiny model registered in a SQLite MLflow store, the app of serve/app.py (the ingress
and 2 fixed model replicas) on a local Ray, and closed-loop HTTP clients (each sends a
review, waits for the answer, sends the next) for the whole run. After a warm-up one
model replica's process gets SIGKILL, as `kill -9 <pid>` would (the PID from Ray's State
API): the requests it was running die with it. Serve's controller notices and starts a
replacement. Load continues until the deployment is back to 2 running model replicas and
a few seconds more.

The clients do not retry (`--retries 0`, the default): the ingress re-sends a prediction
whose model replica died to another replica, so a failed request is any answer but a 200.
The result also gives the ingress's own count of re-sent requests (`internal_retries`):
the requests the kill caught in flight.

Prints one `SCENARIO_RESULT {json}` line.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _scenario  # noqa: E402  (the scenario folder is not a package)

APP = "replica-kill"
MODEL_NAME = "tiny-serve-kill"
DEPLOYMENT = "SentimentClassifier"  # the model deployment (serve.app.DEPLOYMENT_NAME)
INGRESS = "SentimentIngress"
REVIEWS = [
    "A moving story with wonderful acting and a score I still hum.",
    "Dull, predictable and far too long; I checked my watch twice.",
    "Not the best of the series, but the last act is worth the wait.",
]


def register_tiny_model(storage: Path, model_dir: str) -> str:
    """Version 1 of MODEL_NAME, @champion -> 1; returns the tracking URI."""
    import mlflow
    import mlflow.transformers
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipelines.tracking import runs, store_uri
    from pipelines.tracking.registration import model_requirements

    tracking_uri, artifact_root = store_uri.configure(str(storage))
    experiment_id = runs.ensure_experiment("serve-replica-kill", artifact_root)
    with mlflow.start_run(experiment_id=experiment_id):
        mlflow.log_params({"max_length": 64, "truncation": "head_tail"})
        mlflow.transformers.log_model(
            transformers_model={
                "model": AutoModelForSequenceClassification.from_pretrained(model_dir),
                "tokenizer": AutoTokenizer.from_pretrained(model_dir),
            },
            name="model",
            task="text-classification",
            registered_model_name=MODEL_NAME,
            pip_requirements=model_requirements(),
        )
    MlflowClient(tracking_uri).set_registered_model_alias(MODEL_NAME, "champion", "1")
    return tracking_uri


class LoadGenerator:
    """Closed-loop clients (retrying 5xx and transport errors only if asked); every request's outcome is kept."""

    def __init__(self, base_url: str, clients: int, retries: int):
        self.base_url, self.clients, self.retries = base_url, clients, retries
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.outcomes: list[dict] = []  # one per request: start, end, ok, errors (one per failed attempt)
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _attempt(self, http, payload: dict) -> tuple[str | None, bool]:
        """(error or None, retryable)."""
        import httpx

        try:
            response = http.post("/v1/predict", json=payload)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}", True
        if response.status_code == 200 and len(response.json()["predictions"]) == 1:
            return None, False
        return f"HTTP {response.status_code}: {response.text[:200]}", response.status_code >= 500

    def _client(self, index: int) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            sent = 0
            while not self.stop.is_set():
                payload = {"texts": [REVIEWS[(index + sent) % len(REVIEWS)]]}
                sent += 1
                started, errors, ok = time.monotonic(), [], False
                for attempt in range(self.retries + 1):
                    error, retryable = self._attempt(http, payload)
                    if error is None:
                        ok = True
                        break
                    errors.append(error)
                    if not retryable or attempt == self.retries:
                        break
                    time.sleep(0.1 * 2**attempt)  # back-off: 0.1, 0.2, 0.4 s
                with self.lock:
                    self.outcomes.append({"start": started, "end": time.monotonic(), "ok": ok, "errors": errors})

    def count_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for o in self.outcomes if o["start"] >= t)


def alive_replicas() -> list:
    """The model deployment's live replica actors (each with its actor_id, name and pid)."""
    from ray.util.state import list_actors

    return list_actors(
        filters=[("class_name", "=", f"ServeReplica:{APP}:{DEPLOYMENT}"), ("state", "=", "ALIVE")],
        limit=100,
        raise_on_missing_output=False,
    )


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[DEPLOYMENT]
    return status.replica_states.get("RUNNING", 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--retries", type=int, default=0, help="client retries of a 5xx or transport error per request (0: a plain client)")
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--after-recovery-s", type=float, default=4.0)
    args = parser.parse_args(argv)
    _scenario.setup_environment()  # before Ray starts
    workdir: Path = args.workdir.resolve()
    storage = workdir / "storage"
    t0 = time.monotonic()
    timings: dict[str, float] = {}

    model_dir = _scenario.build_tiny_model(workdir / "tiny-bert")
    tracking_uri = register_tiny_model(storage, model_dir)
    timings["register_s"] = round(time.monotonic() - t0, 1)

    import ray
    from ray import serve

    from pipelines.cluster.runtime import init_ray
    from pipelines.core.ports import free_port
    from serve.app import build_app
    from serve.settings import ModelSource, ServingConfig

    init_ray(num_cpus=2)
    # name this cluster for the State API calls below (other Ray clusters may run on this machine)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    port = free_port()
    result: dict = {"clients": args.clients, "retries": args.retries}
    load = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        app = build_app(
            ModelSource(MODEL_NAME, str(storage), tracking_uri),
            # The tiny model answers a batch in ~15 ms, and a request is only lost once its
            # replica accepted it: a 1 s batch wait (the ~4 requests each replica holds never fill
            # a batch of 8) keeps accepted requests on every replica, as a real model's long
            # batches do, so the kill catches some. After the kill one replica gets all 8 clients:
            # full batches, no wait.
            ServingConfig(poll_interval_s=0, max_batch_size=8, batch_wait_timeout_s=1.0),
            num_replicas=2,
            autoscaling_config=None,
            ray_actor_options={"num_cpus": 0.5},
        )
        serve.run(app, name=APP, route_prefix="/")
        _scenario.wait_for(lambda: running_replicas() == 2 and len(alive_replicas()) == 2, 180, 0.5, "2 running replicas")
        timings["deploy_s"] = round(time.monotonic() - t0 - timings["register_s"], 1)
        before = {a.actor_id for a in alive_replicas()}

        load = LoadGenerator(f"http://127.0.0.1:{port}", args.clients, args.retries)
        load.start()
        time.sleep(args.warmup_s)
        warm_requests = load.count_since(0)

        victim = alive_replicas()[0]
        killed_at = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)  # kill -9: no graceful shutdown, in-flight requests die with it
        print(f"[scenario] kill -9 {victim.pid}: model replica actor {victim.actor_id} ({victim.name})", flush=True)
        # recovered: 2 running replicas, the dead one gone from them
        _scenario.wait_for(
            lambda: running_replicas() == 2 and len(alive := {a.actor_id for a in alive_replicas()}) == 2 and victim.actor_id not in alive,
            240,
            0.5,
            "a replacement replica",
        )
        recovered_at = time.monotonic()
        time.sleep(args.after_recovery_s)
        load.join()
        after = {a.actor_id for a in alive_replicas()}
        internal = serve.get_deployment_handle(INGRESS, APP).retry_stats.remote().result(timeout_s=60)

        outcomes = load.outcomes
        failed = [o for o in outcomes if not o["ok"]]
        retried = [o for o in outcomes if o["ok"] and o["errors"]]
        error_kinds = Counter(e.split(":")[0] for o in outcomes for e in o["errors"])
        during = [o for o in outcomes if o["end"] >= killed_at and o["start"] <= recovered_at]
        result.update(
            requests=len(outcomes),
            warmup_requests=warm_requests,
            requests_during_recovery=len(during),
            requests_after_recovery=sum(1 for o in outcomes if o["start"] > recovered_at),
            failed_requests=len(failed),
            failed_examples=[o["errors"] for o in failed[:5]],
            retried_requests=len(retried),
            retried_after_kill=sum(1 for o in retried if o["end"] >= killed_at),
            attempt_errors=dict(error_kinds),
            internal_retries=internal,
            killed_replica=victim.actor_id,
            killed_pid=victim.pid,
            replicas_before=sorted(before),
            replicas_after=sorted(after),
            recovery_s=round(recovered_at - killed_at, 1),
            max_latency_s=round(max((o["end"] - o["start"] for o in outcomes), default=0.0), 2),
        )
    finally:
        if load is not None:
            load.join()
        timings["total_s"] = round(time.monotonic() - t0, 1)
        result["timings"] = timings
        serve.shutdown()
        ray.shutdown()
    _scenario.emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
