"""The Ray Serve application: the champion model behind HTTP, batched, autoscaled, hot-swappable.

    serve run serve/config.yaml                 # local, foreground (config: replicas, batching, limits)
    serve deploy -a http://<head>:8265 serve/config.yaml   # to a running cluster, through its dashboard
    serve run serve.app:app_builder model_version=3
    python -m serve.app [--model-version 3] [--port 8000] ...   # local Ray + Serve, blocks

One deployment, `SentimentClassifier`, is the FastAPI ingress. Each replica:
- loads `models:/<name>@<alias>` (or a pinned version) once, warm, before it reports ready
  (the load happens in `reconfigure`, which Serve runs before the replica takes traffic);
- batches texts from concurrent requests with `@serve.batch` and runs each batch on one
  inference thread, so the event loop keeps accepting requests while the model computes;
- follows the alias: every `poll_interval_s` it asks the registry where the alias points
  and, if it moved, loads and warms the new version beside the old, then swaps one
  reference (serve/model_store.py). A new `user_config` (`serve deploy`) does the same
  in place. Either way no request fails and later answers name the new version.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from ray import serve
from ray.serve import Application

from serve.http_api import build_http_app
from serve.metrics import ServingMetrics
from serve.model_store import ModelSelector, ModelStore, torch_threads_for
from serve.schemas import RequestLimits
from serve.security import ApiKeyGuard, load_api_key
from serve.settings import API_KEY_ENV, API_KEY_FILE_ENV, ModelSource, ScalingSettings, ServingConfig, split_app_args

log = logging.getLogger("ray.serve")  # Serve routes this logger into the replica's log file
DEPLOYMENT_NAME = "SentimentClassifier"
APP_NAME = "imdb-sentiment"
IDLE_POLL_S = 5.0  # how often a replica with polling off re-reads its settings


@serve.deployment(
    name=DEPLOYMENT_NAME,
    ray_actor_options={"num_cpus": 0.5},  # Serve's default (1 CPU) fits only two replicas on 2 cores
    max_ongoing_requests=64,  # >= max_batch_size, or batches never fill
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 16,
        "upscale_delay_s": 5,
        "downscale_delay_s": 30,
    },
    user_config={},  # always set, so that reconfigure (which loads the model) always runs
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=30,
)
@serve.ingress()
class SentimentClassifier:
    """A replica: model store + batcher + registry follower; HTTP comes from serve/http_api.py."""

    def __init__(self, source: dict):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        self.source = ModelSource(**source)
        self.metrics = ServingMetrics()
        self.guard = ApiKeyGuard(load_api_key())
        self.store = ModelStore(self.source.storage, self.source.tracking_uri)
        self.serving = ServingConfig()
        self._limits = self._limits_of(self.serving)
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

    def __serve_build_asgi_app__(self):
        return build_http_app(self)

    # --- configuration (user_config) ------------------------------------------------

    async def reconfigure(self, user_config: dict) -> None:
        serving = ServingConfig.from_user_config(user_config)
        selector = ModelSelector(self.source.model_name, alias=serving.model_alias, version=serving.model_version)
        self._classify.set_max_batch_size(serving.max_batch_size)
        self._classify.set_batch_wait_timeout_s(serving.batch_wait_timeout_s)
        await self._set_threads(serving.num_threads)
        self.serving, self._limits = serving, self._limits_of(serving)
        if self.store.current is None:
            await self._swap(selector)  # nothing to fall back on: a failure fails the replica's start
            self._selector = selector
        elif selector != self._selector:
            try:
                await self._swap(selector)
            except Exception as exc:  # e.g. a pinned version that does not exist: keep serving
                self._record_swap_error(selector, exc)
                return
            self._selector = selector

    @staticmethod
    def _limits_of(serving: ServingConfig) -> RequestLimits:
        return RequestLimits(serving.max_texts, serving.max_text_chars, serving.max_body_bytes)

    async def _set_threads(self, num_threads: int | None) -> None:
        import ray
        import torch

        threads = num_threads or torch_threads_for(ray.get_runtime_context().get_assigned_resources().get("CPU"))
        # torch's thread count is per OS thread once that thread has run an op: set it
        # on the inference thread itself, between batches
        current = await asyncio.get_running_loop().run_in_executor(self._inference, torch.get_num_threads)
        if current != threads:
            await asyncio.get_running_loop().run_in_executor(self._inference, torch.set_num_threads, threads)
            log.info("torch intra-op threads: %d", threads)

    # --- the model: swaps and the registry poll -------------------------------------

    async def _swap(self, selector: ModelSelector) -> None:
        async with self._swap_lock:
            # load + warm-up take seconds: off the event loop and off the inference thread
            loaded = await asyncio.get_running_loop().run_in_executor(None, self.store.swap_to, selector)
        current = self.store.current
        self.metrics.record_model(current.name, current.version, swapped=loaded is not None and self._selector is not None)
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
            selector = self._selector
            if interval <= 0 or selector is None or not selector.follows_alias:
                continue
            try:
                await self._swap(selector)
            except Exception as exc:  # the registry may be down: keep serving the model we have
                self._record_swap_error(selector, exc)

    def check_health(self) -> None:
        if self.store.current is None:
            raise RuntimeError("no model loaded")
        if self._poller.done():
            raise RuntimeError(f"the registry poller stopped: {self._poller.exception()!r}")

    # --- what the HTTP layer calls (serve/http_api.Backend) -------------------------

    def limits(self) -> RequestLimits:
        return self._limits

    def model_info(self) -> dict | None:
        current = self.store.current
        if current is None:
            return None
        selector = self._selector.uri if self._selector else f"models:/{current.name}/{current.version}"
        return {**current.describe(), "selector": selector, "last_error": self._last_error}

    def record_rejection(self, reason: str) -> None:
        self.metrics.record_rejection(reason)

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

def build_app(source: ModelSource, serving: ServingConfig, **deployment_options) -> Application:
    """The bound application; `deployment_options` override the decorator's (replicas, resources...)."""
    if source.tracking_uri is None and os.environ.get("MLFLOW_TRACKING_URI"):
        # resolved here, on the driver, so replicas use the same store wherever they run
        source = ModelSource(source.model_name, source.storage, os.environ["MLFLOW_TRACKING_URI"])
    deployment = SentimentClassifier.options(user_config=serving.as_user_config(), **deployment_options)
    return deployment.bind(asdict(source))


def check_model_exists(source: ModelSource, serving: ServingConfig) -> str:
    """Fail on the driver, with a message, rather than in crash-looping replicas; returns the version."""
    store = ModelStore(source.storage, source.tracking_uri)
    selector = ModelSelector(source.model_name, alias=serving.model_alias, version=serving.model_version)
    return str(store.resolve(selector).version)


def app_builder(args: dict | None = None) -> Application:
    """`import_path: serve.app:app_builder` (config.yaml `args:` -> ModelSource + ServingConfig keys)."""
    source, serving = split_app_args(args)
    check_model_exists(source, serving)
    return build_app(source, serving)


# --- python -m serve.app ------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    from pipelines.cli import add_arguments, from_namespace
    from pipelines.runtime import init_ray

    parser = argparse.ArgumentParser(
        prog="python -m serve.app", description="Serve the registered champion model over HTTP with Ray Serve (blocks until Ctrl-C)."
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
    http.add_argument("--ray-address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and Serve's output on the console too (it always goes to the log file)")
    args = parser.parse_args(argv)
    source, serving, scaling = (from_namespace(cls, args) for cls in (ModelSource, ServingConfig, ScalingSettings))

    from pipelines import console

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
            serve.run(build_app(source, serving, **scaling.deployment_options()), name=args.app_name, route_prefix=args.route_prefix)
            for line in ready_lines(args.host, args.port, args.route_prefix, f"models:/{source.model_name}/{version}"):
                console.say(line)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            console.say("stopping")
        finally:
            serve.shutdown()
    return 0


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
    from pipelines.cli import run_main

    run_main(main)
