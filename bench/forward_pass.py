"""How many texts one forward pass should hold on a CPU: the same texts in passes of 1 to 32.

    python bench/forward_pass.py [--model-uri models:/imdb-sentiment@champion] [--storage DIR]
                                 [--backends torch onnx onnx-int8] [--threads 1] [--batches 4]
                                 [--data imdb] [--register-demo]

A Serve replica batches up to max_batch_size (32) texts and a bare loop takes batches of
32; `pipelines.inference.classifier.Classifier` then runs a call's texts in passes of at most
`CPU_ROWS_PER_PASS`, texts of similar length together. This measures what that is worth:
for each backend, --batches batches of 32 review-length texts (made as bench/serve_load.py
makes them) classified with passes of 32 (the whole batch, as it comes), and of 16, 8, 4,
2 and 1 texts sorted by length; texts/s for each, with --threads threads (1: a replica's
layout on 2 cores). Every variant runs the same texts, alternating, three rounds: the
median counts (the machine's background load drifts).

Last lines: `best_rows_per_pass_<backend>=` and `gain_<backend>=` (texts/s of the best
pass size over one pass of 32), and `rows_per_pass=` (CPU_ROWS_PER_PASS, what the
platform uses for torch and onnx; onnx-int8 runs a text per pass).

For the real measurement, a model trained as in bench/serve_load.py's docstring:

    python bench/forward_pass.py --storage $S

--register-demo registers a tiny random BERT in a new temporary store and measures that: a
smoke test of this script, whose figures say nothing about a real model.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # serve_load, beside this file
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from serve_load import DEFAULT_MODEL_URI, bench_texts, describe_texts, parse_model_uri, register_demo_model  # noqa: E402

from pipelines.core.errors import PlatformError
from pipelines.core.storage import default_storage
from pipelines.inference import batch_prediction
from pipelines.inference.classifier import BACKENDS, CPU_ROWS_PER_PASS, load_classifier_from
from pipelines.tracking import store_uri

BATCH = 32  # what a replica's batch and the bare loop hold (ServingConfig.max_batch_size)
PASS_SIZES = (32, 16, 8, 4, 2, 1)
ROUNDS = 3


def texts_per_s(classifier, batches: list[list[str]], rows_per_pass: int) -> float:
    classifier.rows_per_pass = 0 if rows_per_pass >= BATCH else rows_per_pass
    classifier.probabilities(batches[0])  # warm: kernels and allocations for these shapes
    start = time.perf_counter()
    for batch in batches:
        classifier.probabilities(batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def measure(folder: Path, backend: str, threads: int, batches: list[list[str]]) -> dict[int, float]:
    import torch

    torch.set_num_threads(threads)
    classifier = load_classifier_from(folder, backend, threads=threads)
    rounds: dict[int, list[float]] = {size: [] for size in PASS_SIZES}
    for _ in range(ROUNDS):
        for size in PASS_SIZES:
            rounds[size].append(texts_per_s(classifier, batches, size))
    return {size: statistics.median(values) for size, values in rounds.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-uri", default=DEFAULT_MODEL_URI, help="registered model (default: %(default)s)")
    parser.add_argument("--storage", default=default_storage(), help="storage root holding the local MLflow store (default: %(default)s)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the store under --storage)")
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS, help="backends to measure (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="threads per forward pass (default: %(default)s, a replica's on 2 cores)")
    parser.add_argument("--batches", type=int, default=4, help="batches of 32 texts per measurement (default: %(default)s)")
    parser.add_argument("--data", default=None, help="a prepared dataset whose test split gives the texts (default: lengthened sample reviews)")
    parser.add_argument("--register-demo", action="store_true", help="smoke test: a tiny random BERT in a new temporary store")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="forward-pass-"))
    try:
        if args.register_demo:
            args.storage, args.tracking_uri = str(scratch / "store"), None
            selector = parse_model_uri(args.model_uri)
            register_demo_model(args.storage, selector.name, alias=selector.alias)
            print("demo: a tiny random BERT (figures mean nothing)")
        return run(args, scratch)
    except PlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args, scratch: Path) -> int:
    tracking_uri, _ = store_uri.configure(args.storage, args.tracking_uri)
    model = batch_prediction.resolve_model(args.model_uri, tracking_uri)
    folder = batch_prediction.download_model_folder(model, str(scratch / "model"))
    texts, _, what = bench_texts(args.data, args.storage, BATCH * args.batches)
    batches = [texts[i : i + BATCH] for i in range(0, len(texts), BATCH)]
    print(f"{model.uri}: {len(texts)} texts ({what}); {describe_texts(folder, texts)}")
    print(f"batches of {BATCH}, {args.threads} thread(s), median of {ROUNDS} rounds; texts/s by texts per pass (32: the batch in one pass)")
    print(f"{'backend':<10}" + "".join(f"{size:>9}" for size in PASS_SIZES))
    best = {}
    for backend in args.backends:
        rates = measure(folder, backend, args.threads, batches)
        print(f"{backend:<10}" + "".join(f"{rates[size]:>9.1f}" for size in PASS_SIZES), flush=True)
        best[backend] = (max(rates, key=rates.get), rates)
    for backend, (size, rates) in best.items():
        print(f"best_rows_per_pass_{backend}={size}")
        print(f"gain_{backend}={rates[size] / rates[BATCH]:.2f}")
    print(f"rows_per_pass={CPU_ROWS_PER_PASS}  (onnx-int8: 1, a text per pass, so that its activation scales are the text's own)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
