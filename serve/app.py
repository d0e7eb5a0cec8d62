"""The Ray Serve application: the champion model behind HTTP, batched, autoscaled, hot-swappable.

    serve run serve/config.yaml                 # local, foreground (config: replicas, batching, limits)
    serve deploy -a http://<head>:8265 serve/config.yaml   # to a running cluster, through its dashboard
    serve run serve.app:app_builder model_version=3
    python -m serve.app [--model-version 3] [--port 8000] ...   # local Ray + Serve, blocks

One deployment, `SentimentClassifier`, is both the HTTP ingress and the model (autoscaled,
0.5 CPU each, the ScalingSettings apply here). Per request, one Python process does the
work: the HTTP proxy in front (Serve's, or HAProxy: serve/http_proxy.py) hands the request
to a replica, whose FastAPI app (serve/http_api.py) checks the API key, Content-Type, body
size and limits, and whose batcher puts the texts into the model's next forward pass. A
separate ingress replica would cost a second Python hop per request (an actor call and the
body's (de)serialization): CPU that on a small machine the model does not get (issue 24:
~11 ms per request, a third of the model's own work at int8). Each replica:

- loads `models:/<name>@<alias>` (or a pinned version) once, warm, before it reports ready
  (the load happens in `reconfigure`, which Serve runs before the replica takes traffic);
- batches texts from concurrent requests with `@serve.batch` and runs each batch on one
  inference thread, so the event loop keeps accepting requests while the model computes;
- follows the alias: every `poll_interval_s` it asks the registry where the alias points
  and, if it moved, loads and warms the new version beside the old, then swaps one
  reference (serve/model_store.py). A new `user_config` (`serve deploy`) does the same
  in place. Either way no request fails and later answers name the new version.

A replica that dies mid-request (`kill -9`, OOM, a lost node) takes the requests it holds
with it; the proxy in front sends them again to another replica (predictions are
idempotent): serve/proxy_retry.py behind Serve's proxy, HAProxy's `retry-on` behind HAProxy.

The user_config (serve/settings.py ServingConfig) holds the limits too, so one `serve deploy`
changes the model, batching and the door together. Settings and the API key are checked in
the driver before anything is deployed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve import Application

from pipelines.core.errors import ConfigError
from serve.http_api import build_http_app
from serve.http_proxy import PROXIES, use_haproxy, use_proxy_retry
from serve.metrics import ServingMetrics
from serve.schemas import RequestLimits
from serve.security import ApiKeyGuard, is_loopback, load_api_key, refuse_open_endpoint
from serve.settings import API_KEY_ENV, API_KEY_FILE_ENV, ModelSource, ScalingSettings, ServingConfig, split_app_args

if TYPE_CHECKING:  # serve.model_store imports torch: only replicas (and the driver's check) load it
    from serve.model_store import ModelSelector

log = logging.getLogger("ray.serve")  # Serve routes this logger into the replica's log file
DEPLOYMENT_NAME = "SentimentClassifier"  # the one deployment: HTTP ingress + model (replicas, autoscaling, user_config)
APP_NAME = "imdb-sentiment"
IDLE_POLL_S = 5.0  # how often a replica with polling off re-reads its settings
SERVE_DRAIN_S = 12.0  # python -m serve.app stopping its local Ray: the most it waits for Serve to drain
REPLICA_ACTOR_OPTIONS = {"num_cpus": 0.5}  # Serve's default (1 CPU) fits only two replicas on 2 cores
MODEL_AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16, "upscale_delay_s": 5, "downscale_delay_s": 30}


def limits_of(serving: ServingConfig) -> RequestLimits:
    return RequestLimits(serving.max_texts, serving.max_text_chars, serving.max_body_bytes)


# --- the deployment: HTTP ingress and model in each replica ----------------------------

@serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options=REPLICA_ACTOR_OPTIONS,
    # each HTTP request is one ongoing request: >= max_batch_size, or batches never fill;
    # past it, requests wait in the proxy
    max_ongoing_requests=64,
    autoscaling_config=MODEL_AUTOSCALING,
    user_config={},  # always set, so that reconfigure (which loads the model) always runs
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class SentimentClassifier:
    """A replica: the HTTP door (serve/http_api.Backend) + model store + batcher + registry follower."""

    def __init__(self, source: dict):
        from pipelines.cluster.worker_env import hide_gpus_unless_assigned

        hide_gpus_unless_assigned()  # a replica with num_gpus 0 on a GPU node: no CUDA for torch or ONNX Runtime
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from transformers.utils import logging as hf_logging

        from serve.model_store import ModelStore

        hf_logging.disable_progress_bar()
        self.source = ModelSource(**source)
        self.metrics = ServingMetrics()
        self.guard = ApiKeyGuard(load_api_key())
        self.store = ModelStore(self.source.storage, self.source.tracking_uri)
        self.serving = ServingConfig()
        self._limits = limits_of(self.serving)
        self._selector: ModelSelector | None = None
        self._last_error: str | None = None  # the last failed switch, until one succeeds
        # Torch runs on this one thread: batches never overlap, and the event loop stays
        # free to take requests (they fill the next batch meanwhile).
        self._inference = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        # Set while no batch runs. Requests that arrive during a batch wait here and then
        # join the queue together: without it, Serve's batcher would cut the arrivals into
        # 5 ms slivers (batches of 1-2 texts) queued behind the running one.
        self._batch_idle = asyncio.Event()
        self._batch_idle.set()
        self._swap_lock = asyncio.Lock()
        self._poller = asyncio.get_running_loop().create_task(self._follow_registry())

    # --- configuration (user_config) ------------------------------------------------

    async def reconfigure(self, user_config: dict) -> None:
        from serve.model_store import ModelSelector

        serving = ServingConfig.from_user_config(user_config)
        selector = ModelSelector(self.source.model_name, alias=serving.model_alias, version=serving.model_version)
        self._classify.set_max_batch_size(serving.max_batch_size)
        self._classify.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)
        await self._set_threads(serving.num_threads)
        backend_changed = serving.backend != self.store.backend
        self.serving = serving
        self._limits = limits_of(serving)
        self.store.backend = serving.backend  # the next load uses it; a change loads the model again
        if self.store.current is None:
            await self._swap(selector)  # nothing to fall back on: a failure fails the replica's start
        elif selector != self._selector or backend_changed:
            try:
                await self._swap(selector)
            except Exception as exc:  # e.g. a pinned version that does not exist: keep serving
                self._record_swap_error(selector, exc)

    async def _set_threads(self, num_threads: int | None) -> None:
        import ray
        import torch

        from serve.model_store import torch_threads_for

        threads = num_threads or torch_threads_for(ray.get_runtime_context().get_assigned_resources().get("CPU"))
        self.store.threads = threads  # ONNX Runtime sessions take it at load
        # torch's thread count is per OS thread once that thread has run an op: set it
        # on the inference thread itself, between batches
        current = await asyncio.get_running_loop().run_in_executor(self._inference, torch.get_num_threads)
        if current != threads:
            await asyncio.get_running_loop().run_in_executor(self._inference, torch.set_num_threads, threads)
            log.info("torch intra-op threads: %d", threads)

    # --- the model: swaps and the registry poll -------------------------------------

    async def _swap(self, selector: ModelSelector | None) -> None:
        """Load `selector`'s version and make it the one followed; None: the registry poll of the
        selector followed now, read under the lock (a reconfigure may have pinned a version while
        this waited for it: a selector read before the wait would swap the pin back)."""
        async with self._swap_lock:
            previous = self._selector
            if selector is None:
                selector = previous
                if selector is None or not selector.follows_alias:
                    return
            # load + warm-up take seconds: off the event loop and off the inference thread
            loaded = await asyncio.get_running_loop().run_in_executor(None, self.store.swap_to, selector)
            self._selector = selector
        current = self.store.current
        self.metrics.record_model(current.name, current.version, swapped=loaded is not None and previous is not None)
        self._last_error = None

    def _record_swap_error(self, selector: ModelSelector, exc: Exception) -> None:
        """The old model keeps serving; the error shows in /v1/model, the log and a metric."""
        self.metrics.registry_errors.inc()
        error = f"{selector.uri}: {exc}"
        if error != self._last_error:  # once per distinct error, not once per poll
            log.error("could not switch to %s; still serving v%s: %s", selector.uri, self.store.current.version, exc)
        self._last_error = error

    async def _follow_registry(self) -> None:
        while True:
            interval = self.serving.poll_interval_s
            await asyncio.sleep(interval if interval > 0 else IDLE_POLL_S)
            if interval > 0:
                await self._poll_registry()

    async def _poll_registry(self) -> None:
        """One poll: follow the alias if an alias is what this replica serves (decided under the swap lock)."""
        try:
            await self._swap(None)
        except Exception as exc:  # the registry may be down: keep serving the model we have
            self._record_swap_error(self._selector, exc)

    def check_health(self) -> None:
        if self.store.current is None:
            raise RuntimeError("no model loaded")
        if self._poller.done():
            raise RuntimeError(f"the registry poller stopped: {self._poller.exception()!r}")

    # --- what the HTTP layer calls (serve/http_api.Backend) -------------------------

    def __serve_build_asgi_app__(self):
        return build_http_app(self)

    def limits(self) -> RequestLimits:
        return self._limits

    def record_rejection(self, reason: str) -> None:
        self.metrics.record_rejection(reason)

    def model_info(self) -> dict | None:
        current = self.store.current
        if current is None:
            return None
        selector = self._selector.uri if self._selector else f"models:/{current.name}/{current.version}"
        return {**current.describe(), "selector": selector, "last_error": self._last_error}

    async def predict(self, texts: list[str]) -> list[dict]:
        await self._batch_idle.wait()
        # each text joins the batch queue on its own: max_batch_size counts texts, and a
        # request of many texts shares forward passes with other requests
        return list(await asyncio.gather(*(self._classify(text) for text in texts)))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify(self, texts: list[str]) -> list[dict]:
        model = self.store.current  # one model per batch, even if a swap lands meanwhile
        self._batch_idle.clear()
        try:
            start = time.perf_counter()
            predictions = await asyncio.get_running_loop().run_in_executor(self._inference, model.predict, texts)
        finally:
            self._batch_idle.set()
        self.metrics.record_batch(predictions, time.perf_counter() - start)
        return predictions


# --- building the application -------------------------------------------------------

def check_api_key(options: dict | None = None) -> None:
    """Raise ConfigError now, in the driver, if the replicas would refuse their API key.

    A replica reads the key from its own environment: this process's, plus any
    `runtime_env.env_vars` given to it here. A bad key found only in a replica fails
    the deployment with Ray's traceback and the reason in the controller's log.
    """
    runtime_env = ((options or {}).get("ray_actor_options") or {}).get("runtime_env") or {}
    load_api_key({**os.environ, **(runtime_env.get("env_vars") or {})})


def with_runtime_env_of(options: dict[str, Any], ingress_options: dict[str, Any] | None) -> dict[str, Any]:
    """`options` with the runtime_env of `ingress_options` merged into its ray_actor_options.

    Until issue 24 a separate ingress deployment took HTTP, and callers gave it the API key
    through `ingress_options`' runtime_env; the replicas take HTTP now, so that runtime_env is
    theirs. The rest of those options (the ingress's replicas and CPUs) has nothing left to apply to.
    """
    runtime_env = ((ingress_options or {}).get("ray_actor_options") or {}).get("runtime_env")
    if not runtime_env:
        return options
    actor = dict(options.get("ray_actor_options") or REPLICA_ACTOR_OPTIONS)  # .options() replaces the decorator's
    merged = dict(actor.get("runtime_env") or {})
    merged["env_vars"] = {**(merged.get("env_vars") or {}), **(runtime_env.get("env_vars") or {})}
    merged.update({k: v for k, v in runtime_env.items() if k != "env_vars"})
    return {**options, "ray_actor_options": {**actor, "runtime_env": merged}}


def build_app(
    source: ModelSource,
    serving: ServingConfig,
    *,
    ingress_options: dict[str, Any] | None = None,
    **deployment_options,
) -> Application:
    """The bound application: one deployment, HTTP ingress and model in each replica.

    `deployment_options` override the deployment's decorator options (replicas, autoscaling,
    resources, a runtime_env with the API key...). `ingress_options`: only its runtime_env
    still applies (merged into the replicas'), see with_runtime_env_of.
    """
    from pipelines.core import tracking_env

    deployment_options = with_runtime_env_of(deployment_options, ingress_options)
    check_api_key(deployment_options)
    users_uri = tracking_env.users_tracking_uri()
    if source.tracking_uri is None and users_uri:
        # resolved here, on the driver, so replicas use the same store wherever they run
        source = ModelSource(source.model_name, source.storage, users_uri)
    return SentimentClassifier.options(user_config=serving.as_user_config(), **deployment_options).bind(asdict(source))


def without_credentials(source: ModelSource) -> ModelSource:
    """The source with a tracking URI that holds no password (it goes to the deployment's config,
    which Ray shows): the password goes to the variable MLflow's client or libpq reads instead."""
    from pipelines.tracking.store_uri import take_credentials

    return replace(source, tracking_uri=take_credentials(source.tracking_uri))


def check_model_exists(source: ModelSource, serving: ServingConfig) -> str:
    """Fail on the driver, with a message, rather than in crash-looping replicas; returns the version."""
    from serve.model_store import ModelSelector, ModelStore

    store = ModelStore(source.storage, source.tracking_uri)
    selector = ModelSelector(source.model_name, alias=serving.model_alias, version=serving.model_version)
    return str(store.resolve(selector).version)


def app_builder(args: dict | None = None) -> Application:
    """`import_path: serve.app:app_builder` (config.yaml `args:` -> ModelSource + ServingConfig keys).

    Its HTTP address is the Serve config's (serve/config.yaml: 0.0.0.0), so it needs a key or `allow_anonymous: true`.
    """
    source, serving = split_app_args(args)
    source = without_credentials(source)
    refuse_open_endpoint(load_api_key(), serving.allow_anonymous, "serve.app:app_builder (the app of a Serve config)")
    check_model_exists(source, serving)
    return build_app(source, serving)


# --- python -m serve.app ------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from pipelines.cluster.runtime import init_ray, is_local_cluster
    from pipelines.core.cli import add_arguments, from_namespace

    parser = argparse.ArgumentParser(
        prog="python -m serve.app", description="Serve the registered champion model over HTTP with Ray Serve (blocks until Ctrl-C or SIGTERM)."
    )
    for settings_cls in (ModelSource, ServingConfig, ScalingSettings):
        add_arguments(parser, settings_cls)
    http = parser.add_argument_group("HTTP")
    http.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces) (default: %(default)s)")
    http.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    http.add_argument("--route-prefix", default="/", help="URL prefix of the app (default: %(default)s)")
    http.add_argument("--request-timeout-s", type=float, default=30.0, help="the proxy answers 408 after this long (default: %(default)s)")
    http.add_argument("--app-name", default=APP_NAME, help="Serve application name (default: %(default)s)")
    http.add_argument(
        "--proxy-location", default="EveryNode", choices=("EveryNode", "HeadOnly"),
        help="where Serve runs HTTP proxies: every node (behind a load balancer), or the head only (default: %(default)s)",
    )
    http.add_argument(
        "--http-proxy", default="serve", choices=PROXIES,
        help="what takes HTTP in front of the app: Serve's Python proxy, or HAProxy (less CPU per request; serve/http_proxy.py) (default: %(default)s)",
    )
    http.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and Serve's output on the console too (it always goes to the log file)")
    args = parser.parse_args(argv)
    source, serving, scaling = (from_namespace(cls, args) for cls in (ModelSource, ServingConfig, ScalingSettings))
    source = without_credentials(source)
    # before Ray starts: a bad key or setting is one line and exit 2, not a failed deployment
    api_key = load_api_key()
    if not is_loopback(args.host):
        refuse_open_endpoint(api_key, serving.allow_anonymous, f"--host {args.host}")
    if not args.request_timeout_s > 0:
        raise ConfigError(f"--request-timeout-s must be positive, got {args.request_timeout_s}")
    # where a request whose replica died is sent again: set before a local Ray starts (the
    # proxy reads it from the environment of Ray's processes), checked when joining a cluster
    joining = bool(args.ray_address or os.environ.get("RAY_ADDRESS"))
    if args.http_proxy == "haproxy":
        use_haproxy(joining_cluster=joining)
    elif not use_proxy_retry(joining_cluster=joining):
        log.warning("this cluster's Serve proxies were started without serve/proxy_retry.py: a request whose replica dies fails "
                    "(set RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=serve.proxy_retry:middlewares where the nodes start)")

    from pipelines.core import console, stopping

    stopped = False
    with console.session("serve", console.log_dir_for(source.storage), verbose=args.verbose):
        console.enter("model")
        version = check_model_exists(source, serving)
        console.stage("model", f"models:/{source.model_name}/{version} ({'pinned' if serving.model_version else f'@{serving.model_alias}; replicas follow it'})")
        console.enter("deploy")
        init_ray(args.ray_address)
        serve.start(
            proxy_location=args.proxy_location,
            http_options={"host": args.host, "port": args.port, "request_timeout_s": args.request_timeout_s},
        )
        try:
            app = build_app(source, serving, **scaling.deployment_options())
            serve.run(app, name=args.app_name, route_prefix=args.route_prefix)
            for line in ready_lines(args.host, args.port, args.route_prefix, f"models:/{source.model_name}/{version}"):
                console.say(line)
            while True:
                time.sleep(3600)  # SIGINT and SIGTERM end it (pipelines.core.stopping)
        except KeyboardInterrupt:
            stopped = True
            console.say(f"[serve] {stopping.stop_line()}: shutting down")
        finally:
            shutdown_serve(bounded=is_local_cluster())
    # the session shut down the local Ray and what it left running
    return stopping.exit_code() if stopped else 0


def shutdown_serve(bounded: bool) -> None:
    """serve.shutdown(): replicas finish the requests they hold, then Serve's actors stop.

    `bounded` (a local Ray this process started, which ends next with all its actors): at most
    SERVE_DRAIN_S, so that a stop by a process manager ends within its grace period (30 s)
    even on a loaded machine. Joined to a cluster, Serve there is shut down whole, however long.
    """
    if not bounded:
        serve.shutdown()
        return
    finished = threading.Event()

    def drain() -> None:
        try:
            serve.shutdown()
        except Exception as exc:  # noqa: BLE001 - the local Ray ends right after: a note in the log, not a traceback
            log.warning("Serve's shutdown did not finish (%r); the local Ray ends its actors", exc)
        finally:
            finished.set()

    threading.Thread(target=drain, name="serve-shutdown", daemon=True).start()
    if not finished.wait(SERVE_DRAIN_S):
        log.warning("Serve took over %.0f s to drain; the local Ray ends its actors now", SERVE_DRAIN_S)


def ready_lines(host: str, port: int, route_prefix: str, model: str) -> list[str]:
    """What to tell a person once the endpoint answers: where it is, and a request to try."""
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown_host}:{port}{route_prefix.rstrip('/')}"
    auth = ' -H "Authorization: Bearer $SERVE_API_KEY"' if os.environ.get(API_KEY_ENV) or os.environ.get(API_KEY_FILE_ENV) else ""
    return [
        f"[serve] {model} at {base}/v1/predict  (API docs: {base}/docs; Ctrl-C stops)",
        f"try: curl -s {base}/v1/predict -H 'Content-Type: application/json'{auth} -d '{{\"texts\": [\"A moving story with wonderful acting.\"]}}'",
    ]


if __name__ == "__main__":
    from pipelines.core.cli import run_main

    run_main(main)
