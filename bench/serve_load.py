"""What serving costs, per inference backend: each backend behind Ray Serve over HTTP vs its bare batched inference.

    python bench/serve_load.py [--model-uri models:/imdb-sentiment@champion] [--storage DIR]
                               [--backends torch onnx onnx-int8] [--duration 20] [--concurrency 1 8 32] [--rounds 3]
                               [--replicas 2] [--data imdb] [--http-proxy serve|haproxy] [--unbatched] [--register-demo]

For each backend of --backends (torch, onnx, onnx-int8: the registered version's model
folder, pipelines.inference.variants), with the same texts:

- Serve: the app of serve/app.py deployed afresh with `ServingConfig(backend=...)`, pinned
  to the version, --replicas fixed replicas (autoscaling would move the figures mid-run),
  checked to run that backend, hit by a closed-loop client at each concurrency: every
  client sends one review, waits for the answer, sends the next, on its own keep-alive
  connection. Requests/s, p50/p95/p99 latency, errors and the client's own CPU (in
  cores: it shares the machine, so it is kept to a raw HTTP/1.1 exchange of
  pre-encoded requests) per level, after --warmup seconds. On Linux, also the cores each
  part used in the reported round (from /proc): the replicas (each is the HTTP ingress and
  the model), the HTTP proxy, the client, and the rest (Serve's controller, Ray's GCS,
  raylet and dashboard): what the replicas do not get is where a Serve/bare ratio went.
- Bare: the same `Classifier` (pipelines.inference.classifier.load_classifier_from on the downloaded
  model folder) in this process, batches of --max-batch-size, no HTTP, no Serve: one stream
  with every CPU as threads, and --replicas streams of the replicas' threads each (Serve's
  layout; ONNX Runtime gets one session per stream); the better of the two is this
  machine's limit for the backend. The highest concurrency runs in --rounds rounds, each
  between two bare measurements, and each round's Serve figure is compared with the mean
  of the two around it: on a shared machine the background load drifts (a single round's
  ratio moved by 0.15 from one run to the next on a 2-core VM), and a limit measured
  minutes apart would make the ratio a measure of the neighbours. The round with the
  median ratio is the one reported, with every round's ratio beside it.
- With --http-proxy haproxy, HAProxy takes the HTTP requests instead of Serve's Python
  proxy (serve/http_proxy.py), as `python -m serve.app --http-proxy haproxy` runs it.
  Ray's HAProxy template binds its stats and Prometheus ports on every interface: on Linux
  the benchmark then runs itself in a network namespace of its own (`unshare --net`, root
  or a user namespace), where loopback is the only interface, unless --no-netns.
- With --unbatched, also Serve with batching off (max_batch_size 1) at the highest
  concurrency, per backend, against a third bare measurement.

Texts: with --data, --texts reviews of that prepared dataset's test split ('imdb' for real
reviews); without it, sample-corpus test reviews brought to IMDB's length (median about 230
words, most over 256 tokens; the sample's own run shorter): each review is followed by
further reviews of its label until it reaches a length drawn from a lognormal whose median
ends near 230 words, then cut at a sentence end. The output says which, with their words
and tokens.

Lines at the end: `speedup_int8=` (onnx-int8 vs torch through Serve, req/s at the highest
concurrency), `bare_speedup_int8=` (the same, bare: what the CPU itself gives int8 over
torch, which Serve cannot exceed), `keep_int8=` (speedup_int8 / bare_speedup_int8: the share of
that gain Serve keeps), `accuracy_delta_int8=` (torch minus onnx-int8 test accuracy in points, from
the version's tags `backend.<b>.accuracy` that registration scored on its test split),
`ratio_<backend>=` (Serve req/s / bare texts/s at the highest concurrency), then the
targets: speedup_int8 >= 2.0 with accuracy_delta_int8 <= 0.5; keep_int8 >= 0.9; Serve/bare >= 0.8
for each backend; p99 <= 3 x p50 at the highest concurrency; 0 errors. Last line: `ratio=` (the
lowest ratio_<backend>). Each request carries one review, so requests/s and texts/s are the
same unit. The client, the Serve proxy and the controller run on the same machine and take
their share of its CPUs. Serve logs as deployed (access logs on) into Ray's log folder,
not this terminal. A backend the version marks unusable is skipped (Serve refuses it).

Needs a registered model of the pyfunc format (one with a model folder). The real
measurement, with the bundled MiniLM fine-tuned on the sample corpus at max length 256:

    S=$(mktemp -d)
    python -m pipelines.train_imdb --data sample --epochs 1 --max-length 256 --storage $S
    python bench/serve_load.py --storage $S                 # lengthened sample reviews
    python bench/serve_load.py --storage $S --data sample   # the sample's own test split

--register-demo registers a tiny random BERT (tests/tiny_model.py, max length 256) in a new
temporary store instead, and benchmarks that: a smoke test of this script, whose figures
say nothing about a real model.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Serve logs (access logs on, as serve/config.yaml has them) go to Ray's log folder, not this terminal
os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")

from pipelines.core.errors import PlatformError
from pipelines.core.ports import free_port
from pipelines.core.storage import default_storage
from pipelines.inference.classifier import BACKENDS
from pipelines.tracking.registry import CHAMPION
from serve.http_proxy import PROXIES, run_in_own_network, use_haproxy, use_proxy_retry  # noqa: E402
from serve.model_store import ModelNotFound, ModelSelector, ModelStore  # noqa: E402
from serve.settings import ModelSource, ServingConfig  # noqa: E402

APP_NAME = "serve-load-bench"
DEFAULT_MODEL_URI = f"models:/imdb-sentiment@{CHAMPION}"
# Lengthened sample reviews, drawn to look like IMDB's (median about 230 words, most over 256
# tokens): a target of 240 ends at a median of ~232 words once cleaned, ~57% over 256 tokens,
# 10% under ~140 words and 10% over ~440
REVIEW_MEDIAN_WORDS = 240
REVIEW_WORDS_SIGMA = 0.45
# the targets
TARGET_SPEEDUP_INT8 = 2.0
TARGET_ACCURACY_DELTA_POINTS = 0.5
TARGET_SERVE_RATIO = 0.8
TARGET_KEEP_INT8 = 0.9  # Serve keeps what the CPU gives int8, whatever the CPU
TARGET_P99_OVER_P50 = 3.0
WARMUP_BATCHES = 3  # per bare stream, untimed: the first calls of a session pay for allocation and kernel choice


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


# --- the texts (shared with bench/batch_predict.py) ---------------------------------------------

def lengthened_sample_reviews(count: int, seed: int = 2024) -> tuple[list[str], list[int]]:
    """`count` sample-corpus test reviews at review length, and their labels.

    Each review is followed by more reviews of its label (joined by a paragraph break, as
    IMDB's markup has them) until it reaches a length drawn from a lognormal around
    REVIEW_MEDIAN_WORDS, and cut at the first sentence end past that length.
    """
    from pipelines.data.sample_corpus import generate_reviews

    rng = np.random.default_rng(seed)
    pool = generate_reviews(max(count, 64), seed=seed, split="test")  # 2 x count reviews, half of each label
    by_label = {label: [text for text, lab, _ in pool if lab == label] for label in (0, 1)}
    order = rng.permutation(len(pool))[:count]
    targets = np.clip(rng.lognormal(np.log(REVIEW_MEDIAN_WORDS), REVIEW_WORDS_SIGMA, size=count), 40, 2000).astype(int)
    texts, labels = [], []
    for index, target in zip(order, targets):
        text, label, _ = pool[index]
        parts, words = [text], len(text.split())
        while words < target:
            extra = by_label[label][rng.integers(len(by_label[label]))]
            parts.append(extra)
            words += len(extra.split())
        texts.append(cut_at_sentence("<br /><br />".join(parts), target))
        labels.append(int(label))
    return texts, labels


def cut_at_sentence(text: str, words: int) -> str:
    """The text up to the first sentence end at or past `words` words (all of it if shorter)."""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    kept, count = [], 0
    for sentence in sentences:
        kept.append(sentence)
        count += len(sentence.split())
        if count >= words:
            break
    return " ".join(kept)


def dataset_test_reviews(data: str, storage: str, count: int, seed: int = 2024) -> tuple[list[str], list[int]]:
    """`count` reviews of a prepared dataset's test split (each label in its share), shuffled."""
    from pipelines.data.datasets import load_manifest, read_split_table
    from pipelines.inference.variants import evaluation_sample

    test = read_split_table(load_manifest(data, storage=storage), "test")
    texts, labels = evaluation_sample(test.column("text").to_pylist(), test.column("label").to_pylist(), max_rows=count, seed=seed)
    order = np.random.default_rng(seed).permutation(len(texts))
    return [texts[i] for i in order], [int(labels[i]) for i in order]


def bench_texts(data: str | None, storage: str, count: int) -> tuple[list[str], list[int], str]:
    """(texts, labels, what they are) for the benchmarks."""
    if data:
        texts, labels = dataset_test_reviews(data, storage, count)
        return texts, labels, f"test split of the prepared dataset {data!r}"
    texts, labels = lengthened_sample_reviews(count)
    return texts, labels, (f"sample-corpus test reviews lengthened to review length (joined with more reviews of their label, "
                           f"cut at a sentence end past a length drawn around {REVIEW_MEDIAN_WORDS} words)")


def describe_texts(folder: Path, texts: list[str]) -> str:
    """Words and tokens of the texts as the model in `folder` reads them (cleaned; before and after truncation)."""
    from pipelines.inference.classifier import InferenceSettings, TextEncoder
    from pipelines.text.cleaning import clean_text
    from pipelines.text.tokenization import load_tokenizer

    settings = InferenceSettings.load(folder)
    encoder = TextEncoder(load_tokenizer(str(Path(folder) / "hf")), settings.max_length, settings.truncation)
    max_length = settings.max_length
    cleaned = [clean_text(t) for t in texts]
    full = encoder.tokenizer(cleaned, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    full_lengths = np.asarray([len(ids) + len(encoder.prefix) + len(encoder.suffix) for ids in full])
    kept = np.minimum(full_lengths, max_length)
    words = np.asarray([len(t.split()) for t in cleaned])
    return (f"median {np.median(words):.0f} words (p10 {np.percentile(words, 10):.0f}, p90 {np.percentile(words, 90):.0f}); "
            f"{np.mean(full_lengths > max_length):.0%} over max_length {max_length} tokens; "
            f"mean {kept.mean():.0f} tokens after {encoder.truncation} truncation")


# --- a demo model (smoke tests) ------------------------------------------------------------------

def register_demo_model(storage: str, name: str, max_length: int = 256, alias: str | None = CHAMPION) -> str:
    """Register a tiny random BERT (tests/tiny_model.py) in `storage`'s MLflow store, scored on the
    sample corpus's test split, with `alias`; returns its version. Minutes on 2 CPUs (ONNX export)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.data.prepare import prepare_dataset
    from pipelines.data.settings import PrepareConfig
    from pipelines.tracking import registration, runs, store_uri
    from tests.tiny_model import build_tiny_model

    tracking_uri, artifact_root = store_uri.configure(storage)
    manifest = prepare_dataset(PrepareConfig(source="sample", storage=storage, name="sample", progress=False)).manifest
    model_dir = build_tiny_model(Path(storage) / "tiny-model")
    with mlflow.start_run(experiment_id=runs.ensure_experiment("bench-demo", artifact_root), run_name="tiny-random-bert"):
        info = registration.register_model(model_dir, model_dir, name, manifest, max_length, "head_tail")
    version = str(info.registered_model_version)
    if alias:
        MlflowClient(tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(name, alias, version)
    return version


def download_folder(name: str, version: str, tracking_uri: str, destination: str) -> Path:
    """The version's model folder (hf/, inference.json, model.onnx, model.int8.onnx, variants.json)."""
    from pipelines.inference.batch_prediction import ModelRef, download_model_folder

    return download_model_folder(ModelRef(name, version, f"models:/{name}/{version}", tracking_uri, "torch"), destination)


# --- bare inference ----------------------------------------------------------------------------

class BareModel:
    """One backend's classifiers for the bare layouts: a torch model is shared by its streams
    (torch threads are set per OS thread); ONNX Runtime fixes its threads per session, so each
    stream gets its own session."""

    def __init__(self, folder: Path, backend: str, layouts: list[tuple[int, int]]):
        from pipelines.inference.classifier import load_classifier_from

        self.backend = backend
        self.classifiers: dict[tuple[int, int], list] = {}
        shared = load_classifier_from(folder, "torch") if backend == "torch" else None
        for streams, threads in layouts:
            self.classifiers[(streams, threads)] = (
                [shared] * streams if shared is not None else [load_classifier_from(folder, backend, threads=threads) for _ in range(streams)]
            )

    def throughput(self, texts: list[str], batch_size: int, streams: int, threads: int, seconds: float) -> float:
        """Texts/s of `streams` Python threads each running batches through its classifier."""
        import torch

        classifiers = self.classifiers[(streams, threads)]
        batches = [texts[i : i + batch_size] for i in range(0, len(texts) - batch_size + 1, batch_size)]
        done = [0] * streams
        clock = {}

        def start_clock() -> None:  # runs once, when every stream is warm
            clock["start"] = time.perf_counter()
            clock["stop_at"] = clock["start"] + seconds

        ready = threading.Barrier(streams, action=start_clock)

        def run(stream: int) -> None:
            torch.set_num_threads(threads)  # per OS thread once it has run an op (torch only)
            for batch in batches[stream : stream + WARMUP_BATCHES * streams : streams]:  # allocator, kernels, shapes
                classifiers[stream].probabilities(batch)
            ready.wait()
            index = stream
            while time.perf_counter() < clock["stop_at"]:
                classifiers[stream].probabilities(batches[index % len(batches)])
                done[stream] += batch_size
                index += streams

        workers = [threading.Thread(target=run, args=(s,)) for s in range(streams)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(done) / (time.perf_counter() - clock["start"])


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
    client_cpu: float = float("nan")  # this process's CPU while the level ran, in cores: what the load itself took
    cores: dict[str, float] = field(default_factory=dict)  # cores per role while the level ran (cpu_by_role)


def request_bytes(parts, text: str, headers: dict) -> bytes:
    """One keep-alive POST of {"text": ...} to the URL `parts` (urlsplit), encoded once: the
    client's per-request work is a write and a read."""
    import json

    body = json.dumps({"text": text}).encode()
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def read_response(reader: asyncio.StreamReader) -> int:
    """The status of one HTTP/1.1 response with a Content-Length body (what Serve's proxy sends), body read."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    return status


async def closed_loop(url: str, texts: list[str], concurrency: int, seconds: float, warmup: float, headers: dict) -> LevelResult:
    """`concurrency` clients, each on its own keep-alive connection: send one review, wait, send the next.

    A raw HTTP/1.1 client rather than httpx: it shares the machine with the server, and
    httpx's per-request CPU (about 1 ms, as much as a model replica's share of a request
    at int8) would be charged to Serve. What the client still costs is reported.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    requests = [request_bytes(parts, text, headers) for text in texts]
    latencies: list[float] = []
    errors = 0
    begin = time.perf_counter()
    measure_from, stop_at = begin + warmup, begin + warmup + seconds

    async def client(worker: int) -> None:
        nonlocal errors
        reader = writer = None
        index = worker
        while (now := time.perf_counter()) < stop_at:
            payload = requests[index % len(requests)]
            index += concurrency
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
                writer.write(payload)
                ok = await asyncio.wait_for(read_response(reader), 120) == 200
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ValueError):
                ok = False
                if writer is not None:
                    writer.close()
                reader = writer = None  # a fresh connection for the next request
            done = time.perf_counter()
            if now >= measure_from and done <= stop_at:
                if ok:
                    latencies.append(done - now)
                else:
                    errors += 1
        if writer is not None:
            writer.close()

    await asyncio.gather(*(client(worker) for worker in range(concurrency)))
    ms = np.asarray(latencies) * 1000 if latencies else np.asarray([float("nan")])
    return LevelResult(
        concurrency, len(latencies) / seconds, *(float(np.percentile(ms, q)) for q in (50, 95, 99)), errors, len(latencies) + errors
    )


# --- where the CPU went --------------------------------------------------------------------------

CPU_ROLES = (  # (role, what its processes' command lines contain), first match wins
    ("replicas (HTTP + model)", "SentimentClassifier"),
    ("HTTP proxy", "ProxyActor"),
    ("HTTP proxy", "haproxy"),
    ("HTTP proxy", "HAProxyManager"),
)


def cpu_seconds_by_process() -> dict[int, tuple[str, float, int]]:
    """pid -> (command line, user + system CPU seconds so far, parent pid), from /proc ({} where there is none)."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seen = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        seen[int(entry.name)] = (command, (int(fields[11]) + int(fields[12])) / ticks, int(fields[1]))
    return seen


def descends_from(pid: int, ancestor: int, processes: dict[int, tuple[str, float, int]]) -> bool:
    """Whether `pid` is `ancestor` or below it: this benchmark's local Ray (GCS, raylet, workers) all are."""
    for _ in range(64):  # a parent chain is short; a loop in a racy snapshot must not hang
        if pid == ancestor:
            return True
        if pid not in processes or pid <= 1:
            return False
        pid = processes[pid][2]
    return False


def cpu_by_role(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Cores each role used between two snapshots: the replicas (HTTP and model), the HTTP
    proxy, this client, the rest of this benchmark's Ray (Serve's controller, GCS, raylet,
    dashboard), and the machine's other processes (other people's work on a shared machine)."""
    cores: dict[str, float] = {}
    me = os.getpid()
    for pid, (command, cpu, _) in after.items():
        used = cpu - (before[pid][1] if pid in before else 0.0)
        if pid == me:
            role = "client"
        elif not descends_from(pid, me, after):
            role = "other processes"
        else:
            role = next((name for name, marker in CPU_ROLES if marker in command), "Ray and the rest")
        cores[role] = cores.get(role, 0.0) + used / seconds
    return cores


# --- Serve ---------------------------------------------------------------------------------------


def deploy(source: ModelSource, serving: ServingConfig, replicas: int, cpus_per_replica: float, base_url: str) -> set[str]:
    """A fresh app (new replicas load `serving.backend`); returns the backends its replicas report
    in /v1/model (asked over HTTP, as often as it takes the proxy to reach each replica)."""
    import httpx
    from ray import serve

    from serve.app import build_app

    if APP_NAME in serve.status().applications:
        serve.delete(APP_NAME)
    app = build_app(
        source,
        serving,
        num_replicas=replicas,
        autoscaling_config=None,
        max_ongoing_requests=max(64, 2 * serving.max_batch_size),
        ray_actor_options={"num_cpus": cpus_per_replica},
    )
    serve.run(app, name=APP_NAME, route_prefix="/")
    with httpx.Client(base_url=base_url, headers=auth_headers(), timeout=30) as http:
        return {http.get("/v1/model").json()["backend"] for _ in range(4 * replicas)}


def auth_headers() -> dict:
    from serve.security import load_api_key

    key = load_api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


# --- one backend, and the report -----------------------------------------------------------------

@dataclass
class BackendResult:
    """One backend: the lower concurrencies once, the top one in rounds, each round between two bare runs."""

    backend: str
    levels: list[LevelResult]  # below the top concurrency
    rounds: list[LevelResult]  # the top concurrency, round by round
    bares: list[float]  # bare texts/s before the first round and after each one
    unbatched: LevelResult | None = None
    bare_unbatched: float = float("nan")
    notes: list[str] = field(default_factory=list)

    def round_bare(self, i: int) -> float:
        """The mean of the bare runs right before and after round i."""
        return (self.bares[i] + self.bares[i + 1]) / 2

    def round_ratio(self, i: int) -> float:
        return self.rounds[i].requests_per_s / self.round_bare(i)

    @property
    def ratios(self) -> list[float]:
        return [self.round_ratio(i) for i in range(len(self.rounds))]

    @property
    def median_round(self) -> int:
        """The round whose ratio is the median (the lower middle one of an even count): its figures are reported."""
        order = sorted(range(len(self.rounds)), key=self.round_ratio)
        return order[(len(order) - 1) // 2]

    @property
    def top(self) -> LevelResult:
        return self.rounds[self.median_round]

    @property
    def bare(self) -> float:
        return self.round_bare(self.median_round)

    @property
    def ratio(self) -> float:
        return self.round_ratio(self.median_round)

    @property
    def errors(self) -> int:
        return sum(r.errors for r in [*self.levels, *self.rounds]) + (self.unbatched.errors if self.unbatched else 0)


def print_levels(title: str, results: list[LevelResult], bare: float) -> None:
    print(title)
    print(f"  {'concurrency':>11} {'req/s':>8} {'x bare':>7} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7} {'requests':>9} {'client CPU':>10}")
    for r in results:
        print(f"  {r.concurrency:>11} {r.requests_per_s:>8.1f} {r.requests_per_s / bare:>7.2f} {r.p50_ms:>8.0f} {r.p95_ms:>8.0f} "
              f"{r.p99_ms:>8.0f} {r.errors:>7} {r.requests:>9} {r.client_cpu:>10.2f}")
    sys.stdout.flush()


def accuracy_delta_points(tags: dict) -> float:
    """Torch minus onnx-int8 test accuracy, in points, from the version's tags (nan without them)."""
    try:
        return 100 * (float(tags["backend.torch.accuracy"]) - float(tags["backend.onnx-int8.accuracy"]))
    except (KeyError, ValueError):
        return float("nan")


def report(results: dict[str, BackendResult], tags: dict, eval_rows: int | None, top: int) -> None:
    print(f"\nat concurrency {top}:")
    print(f"  {'backend':>9} {'Serve req/s':>11} {'bare texts/s':>12} {'Serve/bare':>10} {'p50 ms':>7} {'p99 ms':>7} {'p99/p50':>7} {'errors':>6}")
    for r in results.values():
        print(f"  {r.backend:>9} {r.top.requests_per_s:>11.1f} {r.bare:>12.1f} {r.ratio:>10.2f} {r.top.p50_ms:>7.0f} "
              f"{r.top.p99_ms:>7.0f} {r.top.p99_ms / r.top.p50_ms:>7.2f} {r.errors:>6}")
        if r.unbatched:
            ratio_off = r.unbatched.requests_per_s / r.bare_unbatched
            print(f"  {'':>9} batching off: {r.unbatched.requests_per_s:.1f} req/s = {ratio_off:.2f} x bare; on/off {r.ratio / ratio_off:.2f}x")
    torch_r, int8_r = results.get("torch"), results.get("onnx-int8")
    speedup = int8_r.top.requests_per_s / torch_r.top.requests_per_s if torch_r and int8_r else float("nan")
    delta = accuracy_delta_points(tags)
    accuracies = ", ".join(f"{b} {tags[f'backend.{b}.accuracy']}" for b in BACKENDS if f"backend.{b}.accuracy" in tags)
    print(f"test accuracy (version tags, registration's {eval_rows or '?'} test reviews): {accuracies or 'no tags'}; "
          f"default backend {tags.get('backend.default', '?')}")
    print(f"speedup_int8={speedup:.3f}")
    # the same ratio without Serve: what this CPU gives int8 over torch, the ceiling of speedup_int8
    bare_speedup = int8_r.bare / torch_r.bare if torch_r and int8_r else float("nan")
    print(f"bare_speedup_int8={bare_speedup:.3f}")
    keep_int8 = speedup / bare_speedup  # the share of the CPU's int8 gain that survives Serve
    print(f"keep_int8={keep_int8:.3f}")
    print(f"accuracy_delta_int8={delta:.2f}")
    for r in results.values():
        print(f"ratio_{r.backend}={r.ratio:.3f}")

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "BELOW TARGET"

    errors = sum(r.errors for r in results.values())
    print("targets:")
    print(f"  speedup_int8 >= {TARGET_SPEEDUP_INT8} with accuracy_delta_int8 <= {TARGET_ACCURACY_DELTA_POINTS}: "
          f"{speedup:.2f}, {delta:.2f} -> {verdict(speedup >= TARGET_SPEEDUP_INT8 and delta <= TARGET_ACCURACY_DELTA_POINTS)}")
    print(f"  keep_int8 (speedup_int8 / bare_speedup_int8) >= {TARGET_KEEP_INT8}: {keep_int8:.2f} -> {verdict(keep_int8 >= TARGET_KEEP_INT8)}")
    for r in results.values():
        p99_ok = r.top.p99_ms <= TARGET_P99_OVER_P50 * r.top.p50_ms
        print(f"  {r.backend}: Serve/bare >= {TARGET_SERVE_RATIO}: {r.ratio:.2f} -> {verdict(r.ratio >= TARGET_SERVE_RATIO)}; "
              f"p99 <= {TARGET_P99_OVER_P50:g} x p50 at {top}: {r.top.p99_ms:.0f} / {r.top.p50_ms:.0f} ms -> {verdict(p99_ok)}")
    print(f"  0 errors: {errors} -> {verdict(errors == 0)}")
    print(f"ratio={min(r.ratio for r in results.values()):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default=DEFAULT_MODEL_URI, help="registered model to serve (default: %(default)s)")
    parser.add_argument("--storage", default=default_storage(), help="storage root holding the local MLflow store (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the store under --storage)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS, help="backends to measure (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="closed-loop clients per level (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=20.0, help="measured seconds per level (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each level (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs at the top concurrency, each between two bare runs; the median round is reported (default: %(default)s)")
    parser.add_argument("--bare-seconds", type=float, default=8.0, help="seconds per bare measurement and layout (default: %(default)s)")
    parser.add_argument("--replicas", type=int, default=2, help="Serve replicas, fixed during the run (default: %(default)s)")
    parser.add_argument("--cpus-per-replica", type=float, default=None, help="CPUs (and threads) per replica (default: CPUs / replicas)")
    parser.add_argument("--max-batch-size", type=int, default=32, help="Serve's and the bare loop's batch size (default: %(default)s)")
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.005, help="Serve's batch wait (default: %(default)s)")
    parser.add_argument("--texts", type=int, default=512, help="distinct reviews cycled through (default: %(default)s)")
    parser.add_argument("--data", default=None, help="a prepared dataset ('imdb', 'sample', a folder) whose test split gives the texts "
                        "(default: sample-corpus reviews lengthened to review length)")
    parser.add_argument("--http-proxy", default="serve", choices=PROXIES,
                        help="the HTTP proxy in front of the app: Serve's own, or HAProxy (serve/http_proxy.py) (default: %(default)s)")
    parser.add_argument("--no-netns", action="store_true", help="with --http-proxy haproxy: stay in this machine's network "
                        "(HAProxy's stats and metrics ports then listen on every interface)")
    parser.add_argument("--unbatched", action="store_true", help="also measure Serve with batching off at the highest concurrency")
    parser.add_argument("--register-demo", action="store_true", help="smoke test: register a tiny random BERT in a new temporary "
                        "store (ignoring --storage and --tracking-uri) and benchmark it")
    args = parser.parse_args(argv)
    if args.http_proxy == "haproxy" and not args.no_netns:
        run_in_own_network(__file__, sys.argv[1:] if argv is None else argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, not {args.rounds}")
    if args.texts < args.max_batch_size:
        parser.error(f"--texts ({args.texts}) must be at least --max-batch-size ({args.max_batch_size})")

    selector = parse_model_uri(args.model_uri)
    demo_storage = tempfile.mkdtemp(prefix="serve-load-demo-") if args.register_demo else None
    try:
        if demo_storage:
            args.storage, args.tracking_uri = demo_storage, None
            version = register_demo_model(demo_storage, selector.name, alias=selector.alias)
            print(f"demo: a tiny random BERT registered as models:/{selector.name}/{version} in {demo_storage} (figures mean nothing)")
        return run(args, selector)
    except PlatformError as exc:  # no model folder, no such dataset, an unreachable store: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if demo_storage:
            shutil.rmtree(demo_storage, ignore_errors=True)


def run(args, selector: ModelSelector) -> int:
    cpus = os.cpu_count() or 1
    cpus_per_replica = args.cpus_per_replica or cpus / args.replicas
    threads_per_replica = max(1, round(cpus_per_replica))
    store = ModelStore(args.storage, args.tracking_uri)
    try:
        version = store.resolve(selector)
    except ModelNotFound:
        print(
            f"no model at {selector.uri} in {store.tracking_uri}.\n"
            "Train and register one first (see this script's docstring), or point --model-uri / --storage / --tracking-uri at one",
            file=sys.stderr,
        )
        return 2
    from pipelines.inference.variants import load_scores

    name, number, tags = version.name, str(version.version), dict(version.tags or {})
    scratch = tempfile.mkdtemp(prefix="serve-load-model-")
    try:
        folder = download_folder(name, number, store.tracking_uri, scratch)
        texts, _, what = bench_texts(args.data, args.storage, args.texts)
        print(f"model: models:/{name}/{number}; backends in its folder: "
              + ", ".join(f"{v['backend']}{'' if v.get('usable') else ' (unusable)'}" for v in load_scores(folder)["variants"]))
        print(f"texts: {len(texts)} {what}; {describe_texts(folder, texts)}")
        print(f"machine: {cpus} CPUs; Serve behind {args.http_proxy}'s HTTP proxy: {args.replicas} replicas x {cpus_per_replica:g} CPU "
              f"({threads_per_replica} thread(s) each), "
              f"max_batch_size {args.max_batch_size}, batch wait {args.batch_wait_timeout_s * 1000:g} ms; "
              f"{args.duration:g} s per level after {args.warmup:g} s warm-up", flush=True)
        eval_rows = next((v.get("rows") for v in load_scores(folder)["variants"] if v["backend"] == "torch"), None)
        results = measure(args, selector, store.tracking_uri, number, folder, texts, tags, cpus, cpus_per_replica, threads_per_replica)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not results:
        print("no backend could be measured", file=sys.stderr)
        return 1
    report(results, tags, eval_rows, max(args.concurrency))
    return 0


def measure(args, selector, tracking_uri, version, folder, texts, tags, cpus, cpus_per_replica, threads_per_replica) -> dict[str, BackendResult]:
    from ray import serve

    from pipelines.cluster.runtime import init_ray

    layouts = sorted({(1, cpus), (args.replicas, threads_per_replica)})
    # before Ray starts: Serve's controller and proxies read these from their environment
    if args.http_proxy == "haproxy":
        use_haproxy(joining_cluster=False)
    else:
        use_proxy_retry(joining_cluster=False)  # as python -m serve.app runs it
    init_ray(num_cpus=cpus)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 120})
    base_url = f"http://127.0.0.1:{port}"
    url = f"{base_url}/v1/predict"
    headers = auth_headers()
    source = ModelSource(selector.name, args.storage, tracking_uri)
    top = max(args.concurrency)
    results: dict[str, BackendResult] = {}

    def level(concurrency: int) -> LevelResult:
        cpu, wall, processes = time.process_time(), time.perf_counter(), cpu_seconds_by_process()
        result = asyncio.run(closed_loop(url, texts, concurrency, args.duration, args.warmup, headers))
        elapsed = time.perf_counter() - wall
        result.client_cpu = (time.process_time() - cpu) / elapsed
        result.cores = cpu_by_role(processes, cpu_seconds_by_process(), elapsed)
        return result

    try:
        for backend in args.backends:
            if tags.get(f"backend.{backend}.usable") == "false":
                print(f"\n{backend}: skipped, marked unusable (accuracy {tags.get(f'backend.{backend}.accuracy')} vs torch "
                      f"{tags.get('backend.torch.accuracy')}); Serve refuses it", flush=True)
                continue
            bare_model = BareModel(folder, backend, layouts)

            def bare(when: str) -> float:
                rates = [bare_model.throughput(texts, args.max_batch_size, streams, threads, args.bare_seconds) for streams, threads in layouts]
                print(f"  bare {backend} ({when}, load average {os.getloadavg()[0]:.1f}): "
                      + ", ".join(f"{streams} stream(s) x {threads} thread(s) {rate:.1f}" for (streams, threads), rate in zip(layouts, rates))
                      + " texts/s", flush=True)
                return max(rates)

            pin = {"model_version": version, "poll_interval_s": 0.0, "num_threads": threads_per_replica, "backend": backend}
            started = time.perf_counter()
            served = deploy(source, ServingConfig(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_timeout_s, **pin),
                            args.replicas, cpus_per_replica, base_url)
            if served != {backend}:
                raise PlatformError(f"asked Serve for backend {backend}, its replicas run {sorted(served)}")
            print(f"\n{backend}: deployed in {time.perf_counter() - started:.0f} s", flush=True)
            levels = [level(c) for c in sorted(args.concurrency) if c != top]
            bares, rounds = [bare(f"before round 1 at concurrency {top}")], []
            for number in range(1, args.rounds + 1):
                rounds.append(level(top))
                bares.append(bare(f"after round {number}"))
            result = BackendResult(backend, levels, rounds, bares)
            print_levels(f"Serve, {backend}, batching on (concurrency {top}: round {result.median_round + 1} of {args.rounds}, "
                         f"the median one)", [*levels, result.top], result.bare)
            print(f"  Serve/bare at {top}, round by round: " + ", ".join(f"{r:.2f}" for r in result.ratios), flush=True)
            if result.top.cores:
                print(f"  cores used in that round, of {cpus}: "
                      + ", ".join(f"{role} {used:.2f}" for role, used in sorted(result.top.cores.items(), key=lambda item: -item[1])), flush=True)
            if args.unbatched:
                deploy(source, ServingConfig(max_batch_size=1, batch_wait_timeout_s=0.0, **pin), args.replicas, cpus_per_replica, base_url)
                result.unbatched = level(top)
                result.bare_unbatched = (bares[-1] + bare("after batching off")) / 2
                print_levels(f"Serve, {backend}, batching off (max_batch_size 1)", [result.unbatched], result.bare_unbatched)
            results[backend] = result
    finally:
        serve.shutdown()
    return results


if __name__ == "__main__":
    sys.exit(main())
