"""What serving costs: the champion behind Ray Serve over HTTP vs the same model's bare inference.

    python bench/serve_load.py [--model-uri models:/imdb-sentiment@champion] [--storage DIR]
                               [--duration 20] [--concurrency 1 8 32] [--replicas 2]

- Serve, batching on: the app of serve/app.py with --replicas fixed replicas (autoscaling
  would move the figures mid-run), hit by a closed-loop client at each concurrency: every
  client sends one review, waits for the answer, sends the next. Requests/s, p50/p95/p99
  latency and errors per level, after --warmup seconds.
- Serve, batching off (max_batch_size 1), same replicas, at the highest concurrency.
- Bare: the model in this process, batches of --max-batch-size reviews, no HTTP, no Serve:
  one stream using every CPU as a torch thread, and --replicas streams of the replicas'
  threads each (Serve's layout); the better of the two is the limit of this machine.
  Measured right before and right after each highest-concurrency Serve run, and each
  Serve figure is compared with the mean of its two neighbours: on a shared machine the
  background load drifts, and a limit measured minutes apart would make the ratio a
  measure of the neighbours.

Last line: `ratio=<Serve req/s at the highest concurrency / bare texts/s>` (target >= 0.7 with
zero errors); batching on must beat batching off (compared the same way). Each request
carries one review, so requests/s and texts/s are the same unit. The client, the Serve
proxy and the controller run on the same machine and take their share of its CPUs.

Needs a registered model: a trained champion (`make train`) or any --model-uri.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from pipelines.errors import PlatformError  # noqa: E402
from pipelines.registry import CHAMPION  # noqa: E402
from pipelines.storage import default_storage  # noqa: E402
from serve.model_store import ModelNotFound, ModelSelector, ModelStore  # noqa: E402
from serve.settings import ModelSource, ServingConfig  # noqa: E402

APP_NAME = "serve-load-bench"
DEFAULT_MODEL_URI = f"models:/imdb-sentiment@{CHAMPION}"


def parse_model_uri(uri: str) -> ModelSelector:
    """models:/<name>@<alias> or models:/<name>/<version>."""
    if not uri.startswith("models:/"):
        raise PlatformError(f"--model-uri {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    body = uri.removeprefix("models:/")
    if "@" in body:
        name, alias = body.split("@", 1)
        return ModelSelector(name, alias=alias)
    name, _, version = body.rpartition("/")
    return ModelSelector(name, version=version)


def sample_reviews(count: int) -> list[str]:
    """Held-out-style reviews from the project's sample corpus (IMDB-like lengths and markup)."""
    from pipelines.sample_corpus import generate_reviews

    return [text for text, _, _ in generate_reviews(count // 2, seed=2024, split="test")]


# --- bare inference ----------------------------------------------------------------------------

def bare_throughput(model, texts: list[str], batch_size: int, streams: int, threads: int, seconds: float) -> float:
    """Texts/s of `streams` Python threads each running batches through the model, torch at `threads`."""
    import torch

    torch.set_num_threads(threads)
    batches = [texts[i : i + batch_size] for i in range(0, len(texts) - batch_size + 1, batch_size)]
    model.predict(batches[0])  # warm for this thread count
    done = [0] * streams
    stop_at = time.perf_counter() + seconds

    def run(stream: int) -> None:
        torch.set_num_threads(threads)  # per OS thread once it has run an op
        index = stream
        while time.perf_counter() < stop_at:
            model.predict(batches[index % len(batches)])
            done[stream] += batch_size
            index += streams

    start = time.perf_counter()
    workers = [threading.Thread(target=run, args=(s,)) for s in range(streams)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.perf_counter() - start)


# --- the closed-loop client --------------------------------------------------------------------

@dataclass
class LevelResult:
    concurrency: int
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    errors: int
    requests: int


async def closed_loop(url: str, texts: list[str], concurrency: int, seconds: float, warmup: float, headers: dict) -> LevelResult:
    import httpx

    latencies: list[float] = []
    errors = 0
    begin = time.perf_counter()
    measure_from, stop_at = begin + warmup, begin + warmup + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        index = worker
        while (now := time.perf_counter()) < stop_at:
            text = texts[index % len(texts)]
            index += concurrency
            try:
                response = await http.post(url, json={"text": text}, headers=headers)
                ok = response.status_code == 200
            except httpx.HTTPError:
                ok = False
            done = time.perf_counter()
            if now >= measure_from and done <= stop_at:
                if ok:
                    latencies.append(done - now)
                else:
                    errors += 1

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(worker, http) for worker in range(concurrency)))
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return LevelResult(
        concurrency, len(latencies) / seconds, *(float(np.percentile(ms, q)) for q in (50, 95, 99)), errors, len(latencies) + errors
    )


# --- Serve ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deploy(source: ModelSource, serving: ServingConfig, replicas: int, cpus_per_replica: float) -> None:
    from ray import serve

    from serve.app import build_app

    app = build_app(
        source,
        serving,
        num_replicas=replicas,
        autoscaling_config=None,
        max_ongoing_requests=max(64, 2 * serving.max_batch_size),
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    serve.run(app, name=APP_NAME, route_prefix="/")


def auth_headers() -> dict:
    from serve.security import load_api_key

    key = load_api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def print_levels(title: str, results: list[LevelResult]) -> None:
    print(title)
    print(f"  {'concurrency':>11} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} {'requests':>9}")
    for r in results:
        print(f"  {r.concurrency:>11} {r.requests_per_s:>8.1f} {r.p50_ms:>8.0f} {r.p95_ms:>8.0f} {r.p99_ms:>8.0f} {r.errors:>7} {r.requests:>9}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default=DEFAULT_MODEL_URI, help="registered model to serve (default: %(default)s)")
    parser.add_argument("--storage", default=default_storage(), help="storage root holding the local MLflow store (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the store under --storage)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="closed-loop clients per level (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per level (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level (default: %(default)s)")
    parser.add_argument("--bare-seconds", type=float, default=8.0, help="seconds per bare measurement and layout (default: %(default)s)")
    parser.add_argument("--replicas", type=int, default=2, help="Serve replicas, fixed during the run (default: %(default)s)")
    parser.add_argument("--cpus-per-replica", type=float, default=None, help="CPUs (and torch threads) per replica (default: CPUs / replicas)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="Serve's and the bare loop's batch size (default: %(default)s)")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005, help="Serve's batch wait (default: %(default)s)")
    parser.add_argument("--texts", type=int, default=512, help="distinct sample reviews cycled through (default: %(default)s)")
    args = parser.parse_args(argv)

    cpus = os.cpu_count() or 1
    cpus_per_replica = args.cpus_per_replica or max(0.5, cpus / args.replicas)
    threads_per_replica = max(1, int(cpus_per_replica))
    selector = parse_model_uri(args.model_uri)
    store = ModelStore(args.storage, args.tracking_uri)
    try:
        version = store.resolve(selector)
    except ModelNotFound:
        print(
            f"no model at {selector.uri} in {store.tracking_uri}.\n"
            "Train and register one first:  make train   (or point --model-uri / --storage / --tracking-uri at one)",
            file=sys.stderr,
        )
        return 2
    model = store.load(version)
    texts = sample_reviews(args.texts)
    tokens = np.mean([len(ids) for ids in model.token_ids(texts)])
    print(f"model: models:/{model.name}/{model.version} (max_length {model.max_length}, {model.truncation}); "
          f"{len(texts)} sample reviews, mean {tokens:.0f} tokens after truncation")
    print(f"machine: {cpus} CPUs; Serve: {args.replicas} replicas x {cpus_per_replica:g} CPU ({threads_per_replica} torch "
          f"thread(s) each), max_batch_size {args.max_batch_size}, batch wait {args.batch_wait_timeout_s * 1000:g} ms", flush=True)
    layouts = sorted({(1, cpus), (args.replicas, threads_per_replica)})

    def bare(when: str) -> float:
        rates = [bare_throughput(model, texts, args.max_batch_size, streams, threads, args.bare_seconds) for streams, threads in layouts]
        print(f"bare in-process ({when}, load average {os.getloadavg()[0]:.1f}): "
              + ", ".join(f"{streams} stream(s) x {threads} thread(s) {rate:.1f}" for (streams, threads), rate in zip(layouts, rates))
              + " texts/s", flush=True)
        return max(rates)

    from ray import serve

    from pipelines.runtime import init_ray

    init_ray(num_cpus=cpus)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    url = f"http://127.0.0.1:{port}/v1/predict"
    headers = auth_headers()
    source = ModelSource(selector.name, args.storage, store.tracking_uri)
    pin = {"model_version": str(version.version), "poll_interval_s": 0.0, "num_threads": threads_per_replica}
    top = max(args.concurrency)

    def level(concurrency: int) -> LevelResult:
        return asyncio.run(closed_loop(url, texts, concurrency, args.duration, args.warmup, headers))

    try:
        deploy(source, ServingConfig(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s, **pin),
               args.replicas, cpus_per_replica)
        batched = [level(c) for c in sorted(args.concurrency) if c != top]
        bare_before = bare("before Serve at the top concurrency")
        batched.append(level(top))
        print_levels("Serve, batching on", batched)
        bare_between = bare("between")
        deploy(source, ServingConfig(max_batch_size=1, batch_wait_timeout_s=0.0, **pin), args.replicas, cpus_per_replica)
        unbatched = level(top)
        print_levels("Serve, batching off (max_batch_size 1)", [unbatched])
        bare_after = bare("after")
    finally:
        serve.shutdown()

    errors = sum(r.errors for r in batched) + unbatched.errors
    ratio = batched[-1].requests_per_s / ((bare_before + bare_between) / 2)
    ratio_off = unbatched.requests_per_s / ((bare_between + bare_after) / 2)
    print(f"Serve at concurrency {top}: batching on {batched[-1].requests_per_s:.1f} req/s = {ratio:.2f} x bare; "
          f"batching off {unbatched.requests_per_s:.1f} req/s = {ratio_off:.2f} x bare; on/off {ratio / ratio_off:.2f}x; errors {errors}")
    verdict = "PASS" if ratio >= 0.7 and errors == 0 and ratio > ratio_off else "BELOW TARGET"
    print(f"target: ratio >= 0.7, 0 errors, batching on > off -> {verdict}")
    print(f"ratio={ratio:.3f}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
