"""What batch prediction on Ray Data costs: pipelines.inference.batch_prediction against a bare loop of the same backend.

    python bench/batch_predict.py [--model-uri models:/imdb-sentiment@champion] [--storage DIR]
                                  [--backend auto] [--rows 2048] [--batch-size 64] [--actors N] [--per-call N]
                                  [--data imdb] [--register-demo]

Both sides score the same --rows reviews, made as bench/serve_load.py makes its texts
(--data's test split, or sample reviews lengthened to review length) and written to a
temporary Parquet folder of --files parts, with the version's default backend (or --backend):

- Ray Data: `batch_prediction.predictions(...)` (read_parquet -> map_batches on an actor pool
  of --actors, or pipelines.predict's plan: one single-threaded actor per CPU; batches of --batch-size),
  consumed with `iter_tables` as `python -m pipelines.predict` does, minus the Parquet write.
- Bare: `load_classifier_from` on the same model folder, batches of --batch-size over the
  same texts, no Ray, in the two layouts a user could pick (one model with every CPU as
  threads; one single-threaded model per CPU, each in its own Python thread), the faster
  counting: the first half of the texts before the Ray Data run and the second half after
  it (Ray shut down), so that a drifting background load weighs on both sides alike.

Start-up (planning, actors starting, downloading and loading the model) is a fixed cost
whatever the input's size; `ratio_batch=` (last line, target >= 0.9) compares Ray Data's
steady rate with the bare loop's: the rows of the blocks after each actor's first, over the
time from the last of those first blocks to the last block (the actors deliver side by side,
so a round's blocks arrive together). `ratio_batch_with_startup=` is the whole job's rate,
start-up included, for this input size. An actor scores pipelines.predict's rows per call
(Ray Data joins the Parquet parts up to it: batch_prediction.rows_per_call), or --per-call's;
`--per-call` equal to `--batch-size` gives each part a call of its own, as before. The labels
of the two sides are compared too: the same preprocessing and backend on the same batches
(parts of a multiple of --batch-size rows line up with the bare loop's) should give the same labels.

For the real measurement, a model trained as in bench/serve_load.py's docstring:

    python bench/batch_predict.py --storage $S

--register-demo registers a tiny random BERT in a new temporary store and measures that:
a smoke test of this script, whose figures say nothing about a real model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_load, beside this file
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from serve_load import DEFAULT_MODEL_URI, bench_texts, describe_texts, parse_model_uri, register_demo_model  # noqa: E402

from pipelines.core.errors import PlatformError
from pipelines.core.storage import default_storage
from pipelines.inference import batch_prediction
from pipelines.inference.classifier import BACKENDS, load_classifier_from
from pipelines.tracking import store_uri

TARGET_RATIO = 0.9


def write_parquet(folder: Path, texts: list[str], labels: list[int], files: int) -> str:
    """The texts as `files` Parquet parts (Ray Data reads one block per file) with row ids."""
    folder.mkdir(parents=True, exist_ok=True)
    bounds = np.linspace(0, len(texts), files + 1).astype(int)
    for part, (first, last) in enumerate(zip(bounds[:-1], bounds[1:])):
        table = pa.table({"id": np.arange(first, last), "text": texts[first:last], "label": labels[first:last]})
        pq.write_table(table, folder / f"part-{part:05d}.parquet")
    return str(folder)


def bare_loop(classifiers: list, threads: int, texts: list[str], batch_size: int) -> tuple[np.ndarray, float]:
    """(label ids, seconds) of one pass over the texts in batches, one Python thread per
    classifier taking every len(classifiers)-th batch, after a warm-up batch each."""
    starts = range(0, len(texts), batch_size)
    labels: dict[int, np.ndarray] = {}
    ready = threading.Barrier(len(classifiers) + 1)

    def stream(index: int) -> None:
        import torch

        torch.set_num_threads(threads)  # torch's count is per OS thread (ONNX Runtime's per session)
        classifiers[index].probabilities(texts[:batch_size])  # allocator, kernel choice, thread pools
        ready.wait()
        for start in starts[index :: len(classifiers)]:
            labels[start] = classifiers[index].probabilities(texts[start : start + batch_size]).argmax(axis=-1)

    workers = [threading.Thread(target=stream, args=(i,)) for i in range(len(classifiers))]
    for worker in workers:
        worker.start()
    ready.wait()
    began = time.perf_counter()
    for worker in workers:
        worker.join()
    seconds = time.perf_counter() - began
    return np.concatenate([labels[start] for start in starts]), seconds


def best_bare(layouts: dict[str, tuple[list, int]], texts: list[str], batch_size: int, when: str) -> tuple[np.ndarray, float]:
    """Each bare layout over the same texts; (the labels, the fastest layout's seconds)."""
    results = {name: bare_loop(classifiers, threads, texts, batch_size) for name, (classifiers, threads) in layouts.items()}
    print(f"bare loop, {when} (load average {os.getloadavg()[0]:.1f}): "
          + ", ".join(f"{name} {len(texts) / seconds:.1f}" for name, (_, seconds) in results.items()) + " texts/s", flush=True)
    return next(iter(results.values()))[0], min(seconds for _, seconds in results.values())


def ray_data_run(input_uri: str, model, rows: int, batch_size: int, actors: int | None, cpus: int,
                 per_call: int | None) -> tuple[np.ndarray, list[tuple[float, int]]]:
    """(label ids by row id, (seconds since the start, rows) of each output block as it arrives)."""
    import ray

    from pipelines.cluster.runtime import init_ray

    init_ray(num_cpus=cpus)
    try:
        dataset = batch_prediction.predictions(input_uri, model, "text", batch_size, actors, rows, per_call)
        labels = np.full(rows, -1, dtype=np.int64)
        arrivals = []
        start = time.perf_counter()
        for table in batch_prediction.iter_tables(dataset, rows, "ray data"):
            labels[table.column("id").to_numpy()] = table.column("predicted_label_id").to_numpy()
            if table.num_rows:
                arrivals.append((time.perf_counter() - start, table.num_rows))
    finally:
        ray.shutdown()
    return labels, arrivals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default=DEFAULT_MODEL_URI, help="registered model (default: %(default)s)")
    parser.add_argument("--storage", default=default_storage(), help="storage root holding the local MLflow store (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the store under --storage)")
    parser.add_argument("--backend", default="auto", choices=("auto", *BACKENDS),
                        help="backend on both sides; auto: the version's default (default: %(default)s)")
    parser.add_argument("--rows", type=int, default=2048, help="reviews scored by each side (default: %(default)s)")
    parser.add_argument("--files", type=int, default=16, help="Parquet parts the rows are written to (Ray Data blocks) (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="texts per model call, both sides, as pipelines.predict (default: %(default)s)")
    parser.add_argument("--actors", type=int, default=None, help="Ray Data actors, sharing the CPUs (default: pipelines.predict's plan, one per CPU)")
    parser.add_argument("--per-call", type=int, default=None,
                        help="rows per actor call (default: pipelines.predict's, up to 512; --per-call equal to --batch-size: "
                             "every Parquet part a call of its own, as before 2026-12-07)")
    parser.add_argument("--data", default=None, help="a prepared dataset whose test split gives the texts (default: lengthened sample reviews)")
    parser.add_argument("--register-demo", action="store_true", help="smoke test: register a tiny random BERT in a new temporary "
                        "store (ignoring --storage and --tracking-uri) and measure it")
    args = parser.parse_args(argv)
    if args.rows < 2 * args.batch_size or args.files < 2 or args.rows < args.files or (args.actors is not None and args.actors < 1):
        parser.error("need --rows >= 2 x --batch-size, 2 <= --files <= --rows (the first block is start-up) and --actors >= 1")

    scratch = Path(tempfile.mkdtemp(prefix="batch-predict-bench-"))
    try:
        if args.register_demo:
            selector = parse_model_uri(args.model_uri)
            args.storage, args.tracking_uri = str(scratch / "storage"), None
            version = register_demo_model(args.storage, selector.name, alias=selector.alias)
            print(f"demo: a tiny random BERT registered as models:/{selector.name}/{version} (figures mean nothing)")
        return run(args, scratch)
    except PlatformError as exc:  # no such model or backend, no model folder, no such dataset: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args, scratch: Path) -> int:
    cpus = os.cpu_count() or 1
    tracking_uri, _ = store_uri.configure(args.storage, args.tracking_uri)
    model = batch_prediction.resolve_model(args.model_uri, tracking_uri, args.backend)
    folder = batch_prediction.download_model_folder(model, str(scratch / "model"))
    texts, labels, what = bench_texts(args.data, args.storage, args.rows)
    input_uri = write_parquet(scratch / "input", texts, labels, args.files)
    print(f"model: {model.uri} ({args.model_uri}), backend {model.backend}")
    print(f"texts: {len(texts)} {what}; {describe_texts(folder, texts)}")
    print(f"machine: {cpus} CPUs; Ray Data: {args.actors or 'planned'} actor(s), {args.files} Parquet parts; batches of {args.batch_size}", flush=True)

    # the best a user could do without Ray: one model with every CPU as threads, or one
    # single-threaded model per CPU (ONNX Runtime fixes threads per session: one each)
    layouts = {f"1 x {cpus} threads": ([load_classifier_from(folder, model.backend, threads=cpus)], cpus)}
    if cpus > 1:
        layouts[f"{cpus} x 1 thread"] = ([load_classifier_from(folder, model.backend, threads=1) for _ in range(cpus)], 1)
    half = len(texts) // 2
    bare_first, seconds_first = best_bare(layouts, texts[:half], args.batch_size, "first half")
    actors = batch_prediction.plan_actors(args.actors, args.files, cpus).actors
    per_call = args.per_call or batch_prediction.rows_per_call(len(texts), actors, args.batch_size)
    print(f"Ray Data: {actors} actor(s), {per_call} rows per call", flush=True)
    ray_labels, arrivals = ray_data_run(input_uri, model, len(texts), args.batch_size, args.actors, cpus, args.per_call)
    if len(arrivals) <= actors:
        print(f"error: {len(arrivals)} blocks for {actors} actors: too few to see a steady rate (more --rows, or a smaller --per-call)", file=sys.stderr)
        return 2
    # the steady part starts once every actor delivered its first block: the actors work side by
    # side, so the blocks of one round arrive together, and timing from the very first block
    # would credit that round's other blocks to no time at all
    whole_s, (first_s, _) = arrivals[-1][0], arrivals[0]
    round_s, round_rows = arrivals[actors - 1][0], sum(n for _, n in arrivals[:actors])
    steady_rows, steady_s = len(texts) - round_rows, whole_s - round_s
    print(f"Ray Data: {len(texts) / whole_s:.1f} rows/s with start-up ({whole_s:.1f} s); first block after {first_s:.1f} s "
          f"(planning, actor start, model download and load), one from each actor after {round_s:.1f} s ({round_rows} rows), "
          f"then {steady_rows} rows in {len(arrivals) - actors} blocks at {steady_rows / max(steady_s, 1e-9):.1f} rows/s", flush=True)
    bare_second, seconds_second = best_bare(layouts, texts[half:], args.batch_size, "second half")

    bare_rate = len(texts) / (seconds_first + seconds_second)
    bare_labels = np.concatenate([bare_first, bare_second])
    same = int((ray_labels == bare_labels).sum())
    ratio_steady = steady_rows / max(steady_s, 1e-9) / bare_rate
    ratio_whole = len(texts) / whole_s / bare_rate
    print(f"bare loop (the faster layout of each half): {bare_rate:.1f} texts/s; labels equal on {same}/{len(texts)} rows")
    print(f"target: ratio_batch >= {TARGET_RATIO} -> {'PASS' if ratio_steady >= TARGET_RATIO else 'BELOW TARGET'}")
    print(f"ratio_batch_with_startup={ratio_whole:.3f}")
    print(f"ratio_batch={ratio_steady:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
