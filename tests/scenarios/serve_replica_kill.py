"""Kill -9 each process on a request's path under steady load, in one Serve start; a plain client must lose nothing it need not.

    python tests/scenarios/serve_replica_kill.py WORKDIR [--clients 8] [--retries 0] [--requests-per-kill 200] [--http-proxy serve|haproxy]

A tiny model registered in a SQLite MLflow store, the app of serve/app.py (2 fixed replicas,
each the HTTP ingress and the model) behind Serve's proxy with serve/proxy_retry.py, as
`python -m serve.app` runs it, on a local Ray; closed-loop HTTP clients (each sends a review,
waits for the answer, sends the next) for the whole run. Two kills, as `kill -9 <pid>` would
(PIDs from Ray's State API), each once the load is warm:

1. a replica (the ingress and the model: there is no other ingress): the requests it was
   running die with it; the proxy sends them again to the other replica. Serve's
   controller starts a replacement; load goes on until the deployment is back to 2 running
   replicas, --requests-per-kill requests have started since the kill and
   --requests-after-recovery since the replacement.
2. Serve's HTTP proxy: the requests on its connections die with it (no other process holds
   those connections), and until the controller starts a new one nothing listens on the
   port. Load goes on until the new proxy answers and as many requests as after the replica
   kill have started. Serve's controller replaces a dead proxy after 3 failed health checks;
   the scenario checks every second (RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S=1; Ray's default 10).

The clients do not retry (`--retries 0`, the default): a failed request is any answer but a
200. A client whose request failed waits PAUSE_AFTER_FAILURE_S before its next one (a
plain client, not one spinning on a closed port). Per kill the result gives the failures,
split into those in flight at the kill and those refused afterwards, and the requests the
proxy sent again (answers with `X-Serve-Attempts` > 1).

With --http-proxy haproxy the same runs behind Ray Serve's HAProxy (serve/http_proxy.py
`use_haproxy`, with its re-send of a request whose replica died), in a network namespace of
its own (HAProxy binds ports on every interface); the proxy killed is the HAProxy process.
HAProxy does not say whether it re-sent a request, so `resent_by_proxy` is 0 there. Serve's
controller replaces a dead HAProxy like a dead proxy actor; the new one answers 404
(`no_route_404`) until the controller has sent it the routes (its /-/healthz answers 503
until then). Not a test of the suite: on Ray 2.60 HAProxy loses some of the requests that
were on a replica when it died (docs/serving.md, "HTTP proxy"), so it is not the mode the
clusters run.

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
DEPLOYMENT = "SentimentClassifier"  # the one deployment, HTTP ingress and model (serve.app.DEPLOYMENT_NAME)
PROXY = "ProxyActor"  # Serve's HTTP proxy, one per node
PAUSE_AFTER_FAILURE_S = 0.05
NO_ROUTE_404 = "HTTP 404: Path '/v1/predict' not found"  # a new proxy's answer before it has the routes (Serve's proxy and Ray's HAProxy template alike)
PROXY_HEALTH_CHECK_PERIOD_S = "1"  # how soon Serve's controller notices a dead proxy (3 checks in a row), default 10
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
        self.outcomes: list[dict] = []  # one per request: start, end, ok, errors (one per failed attempt), attempts (the proxy's)
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def _attempt(self, http, payload: dict) -> tuple[str | None, bool, int]:
        """(error or None, retryable, the tries the proxy made: its X-Serve-Attempts)."""
        import httpx

        try:
            response = http.post("/v1/predict", json=payload)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}", True, 1
        attempts = int(response.headers.get("x-serve-attempts", "1"))
        if response.status_code == 200 and len(response.json()["predictions"]) == 1:
            return None, False, attempts
        return f"HTTP {response.status_code}: {response.text[:200]}", response.status_code >= 500, attempts

    def _client(self, index: int) -> None:
        import httpx

        with httpx.Client(base_url=self.base_url, timeout=60) as http:
            sent = 0
            while not self.stop.is_set():
                payload = {"texts": [REVIEWS[(index + sent) % len(REVIEWS)]]}
                sent += 1
                started, errors, ok, attempts = time.monotonic(), [], False, 1
                for attempt in range(self.retries + 1):
                    error, retryable, attempts = self._attempt(http, payload)
                    if error is None:
                        ok = True
                        break
                    errors.append(error)
                    if not retryable or attempt == self.retries:
                        break
                    time.sleep(0.1 * 2**attempt)  # back-off: 0.1, 0.2, 0.4 s
                with self.lock:
                    self.outcomes.append({"start": started, "end": time.monotonic(), "ok": ok, "errors": errors, "attempts": attempts})
                if not ok:
                    time.sleep(PAUSE_AFTER_FAILURE_S)

    def count_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for o in self.outcomes if o["start"] >= t)


def alive_actors(class_name: str) -> list:
    """Live actors of a class (each with its actor_id, name and pid)."""
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")], limit=100, raise_on_missing_output=False)


def alive_replicas() -> list:
    return alive_actors(f"ServeReplica:{APP}:{DEPLOYMENT}")


def running_replicas() -> int:
    from ray import serve

    status = serve.status().applications[APP].deployments[DEPLOYMENT]
    return status.replica_states.get("RUNNING", 0)


def proxy_answers(base_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base_url}/-/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def kill(pid: int, what: str) -> float:
    """kill -9 the process (no graceful shutdown: what it holds dies with it); the time of the kill."""
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    print(f"[scenario] kill -9 {pid}: {what}", flush=True)
    return killed_at


def proxy_pids(http_proxy: str) -> set[int]:
    """The PIDs of the HTTP proxy: Serve's ProxyActor, or the HAProxy that serve/http_proxy.py configured."""
    if http_proxy == "serve":
        return {a.pid for a in alive_actors(PROXY)}
    folder = os.environ["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"].encode()  # its config is in there, per node
    pids = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"haproxy") and any(arg.startswith(folder + b"/") for arg in argv):
            pids.add(int(entry.name))
    return pids


def enough_load(load: LoadGenerator, killed_at: float, recovered_at: float, args) -> None:
    """Wait until --requests-per-kill requests started since the kill, --requests-after-recovery of them after the recovery."""
    _scenario.wait_for(
        lambda: load.count_since(killed_at) >= args.requests_per_kill and load.count_since(recovered_at) >= args.requests_after_recovery,
        120, 0.2, f"{args.requests_per_kill} requests since the kill",
    )


def summary(outcomes: list[dict], killed_at: float, recovered_at: float, clients: int) -> dict:
    """One kill: the requests from the kill on, and how the failed ones failed."""
    since = [o for o in outcomes if o["end"] >= killed_at]
    failed = [o for o in since if not o["ok"]]
    return {
        "requests": len(since),
        # the request each client had out when the process died (some of them on it)
        "in_flight_at_kill": sum(1 for o in since if o["start"] < killed_at),
        "requests_during_recovery": sum(1 for o in since if o["start"] <= recovered_at),
        "requests_after_recovery": sum(1 for o in since if o["start"] > recovered_at),
        "failed_requests": len(failed),
        # at most one per client: the request each had on the dead process
        "failed_in_flight": sum(1 for o in failed if o["start"] < killed_at),
        "failed_after_kill": sum(1 for o in failed if o["start"] >= killed_at),
        "failed_after_recovery": sum(1 for o in failed if o["start"] > recovered_at),
        "failed_examples": [o["errors"] for o in failed[:5]],
        "failed_examples_s": [(round(o["start"] - killed_at, 2), round(o["end"] - killed_at, 2)) for o in failed[:5]],  # from the kill
        "error_kinds": dict(Counter(e.split(":")[0] for o in failed for e in o["errors"])),
        # a new proxy answers 404 until Serve's controller sent it the routes (a new HAProxy's
        # /-/healthz says 503 until then; serve/proxy_retry.py holds Serve's): these, and when
        # the last failure started
        "no_route_404": sum(1 for o in failed for e in o["errors"] if e.startswith(NO_ROUTE_404)),
        "last_failure_start_s": round(max((o["start"] for o in failed), default=killed_at) - killed_at, 2),
        "resent_by_proxy": sum(1 for o in since if o["ok"] and o["attempts"] > 1),
        "recovery_s": round(recovered_at - killed_at, 1),
        "max_latency_s": round(max((o["end"] - o["start"] for o in since), default=0.0), 2),
        "clients": clients,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--retries", type=int, default=0, help="client retries of a 5xx or transport error per request (0: a plain client)")
    parser.add_argument("--warmup-s", type=float, default=4.0)
    parser.add_argument("--requests-per-kill", type=int, default=200, help="requests started after each kill before the next step")
    parser.add_argument("--http-proxy", default="serve", choices=("serve", "haproxy"), help="the HTTP proxy in front (default: %(default)s)")
    parser.add_argument("--requests-after-recovery", type=int, default=50, help="of those, requests started once the dead process was replaced")
    args = parser.parse_args(argv)
    _scenario.setup_environment()  # before Ray starts
    from serve.http_proxy import run_in_own_network, use_haproxy, use_proxy_retry

    if args.http_proxy == "haproxy":
        run_in_own_network(__file__, sys.argv[1:] if argv is None else argv)
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

    # as python -m serve.app runs them: Serve's proxy with serve/proxy_retry.py, or HAProxy with its retry-on
    if args.http_proxy == "haproxy":
        use_haproxy(joining_cluster=False)
    else:
        use_proxy_retry(joining_cluster=False)
    os.environ["RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S"] = PROXY_HEALTH_CHECK_PERIOD_S
    init_ray(num_cpus=2)
    # name this cluster for the State API calls below (other Ray clusters may run on this machine)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    result: dict = {"clients": args.clients, "retries": args.retries, "http_proxy": args.http_proxy}
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

        load = LoadGenerator(base_url, args.clients, args.retries)
        load.start()
        time.sleep(args.warmup_s)
        result["warmup_requests"] = load.count_since(0)

        # 1. a replica: recovered once 2 replicas run again, the dead one not among them
        victim = alive_replicas()[0]
        killed_at = kill(victim.pid, f"replica (HTTP ingress + model) {victim.actor_id} ({victim.name})")
        _scenario.wait_for(
            lambda: running_replicas() == 2 and len(alive := {a.actor_id for a in alive_replicas()}) == 2 and victim.actor_id not in alive,
            240, 0.5, "a replacement replica",
        )
        recovered_at = time.monotonic()
        enough_load(load, killed_at, recovered_at, args)
        result["replica_kill"] = {
            **summary(list(load.outcomes), killed_at, recovered_at, args.clients),
            "killed": victim.actor_id, "replicas_before": sorted(before), "replicas_after": sorted(a.actor_id for a in alive_replicas()),
        }
        timings["replica_kill_s"] = round(time.monotonic() - killed_at, 1)

        # 2. the HTTP proxy: recovered once a new one answers on the port
        proxy = min(proxy_pids(args.http_proxy))
        killed_at = kill(proxy, f"the HTTP proxy ({args.http_proxy})")
        _scenario.wait_for(lambda: proxy_answers(base_url) and proxy not in proxy_pids(args.http_proxy), 120, 0.2, "a new proxy")
        recovered_at = time.monotonic()
        enough_load(load, killed_at, recovered_at, args)
        load.join()
        result["proxy_kill"] = {**summary(list(load.outcomes), killed_at, recovered_at, args.clients), "killed_pid": proxy}
        timings["proxy_kill_s"] = round(time.monotonic() - killed_at, 1)
        result["requests"] = len(load.outcomes)
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
