"""`python -m pipelines.predict`: score a Parquet file or folder of reviews with a registered model.

Examples:
    python -m pipelines.predict --input reviews.parquet --output scored/                # @champion, local Ray
    python -m pipelines.predict --model models:/imdb-sentiment/3 --backend onnx-int8 \\
        --input s3://bucket/reviews/ --output s3://bucket/scored/2026-11-28/ --actors 4

The output holds every input column plus predicted_label, predicted_label_id, score and probability_<label>,
in Parquet parts committed at the end: `_SUCCESS` lists them and is written last. A run that
fails or is killed, --overwrite included, leaves the previous output whole (readers take the
parts `_SUCCESS` lists: pipelines.core.committed_parts). The model runs with its training's
preprocessing (pipelines.inference.classifier), the backend being the version's default unless
--backend names another.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from pipelines.cluster import runtime
from pipelines.core import cli, console
from pipelines.core.cli import field
from pipelines.core.errors import ConfigError
from pipelines.core.storage import default_storage
from pipelines.inference import batch_prediction
from pipelines.tracking import store_uri


@dataclass(frozen=True)
class PredictConfig:
    """Score reviews in Parquet with a registered model, on Ray Data."""

    input: str = field("", "a Parquet file, a folder of them, or an s3:// / gs:// URI (required)")
    output: str = field("", "folder or URI to write the scored rows to (required)")
    model: str = field("models:/imdb-sentiment@champion", "registered model: models:/<name>@<alias> or models:/<name>/<version>")
    backend: str = field("auto", "inference backend: auto (the version's default), torch, onnx or onnx-int8")
    text_column: str = field("text", "the column that holds the reviews")
    batch_size: int = field(64, "texts per model call")
    actors: int | None = field(None, "model replicas (Ray Data actors) scoring in parallel (default: one per CPU, one thread each, at most one per input file)")
    overwrite: bool = field(False, "replace an existing output")
    storage: str = field(default_storage(), "storage root whose local MLflow store is used without a tracking URI")
    tracking_uri: str | None = field(None, "MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else the store under --storage)")
    ray_address: str | None = field(None, "Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")

    def __post_init__(self) -> None:
        if not self.input:
            raise ConfigError("--input is required: a Parquet file, folder or URI")
        if not self.output:
            raise ConfigError("--output is required: a folder or URI")
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise ConfigError("--batch-size and --actors must be at least 1")


def run_predict(config: PredictConfig) -> tuple[int, int]:
    """Score `config.input` into `config.output`; (rows, files) written."""
    console.enter("model")
    tracking_uri, _ = store_uri.configure(config.storage, config.tracking_uri)
    model = batch_prediction.resolve_model(config.model, tracking_uri, config.backend)
    console.stage("model", f"{model.uri}{'' if config.model == model.uri else f' ({config.model})'}, backend {model.backend}")
    console.enter("data")
    batch_prediction.check_output(config.output, config.overwrite)
    rows = batch_prediction.rows_of(config.input)
    console.stage("data", f"{rows} rows in {config.input}")
    console.enter("predict")
    runtime.init_ray(config.ray_address)
    dataset = batch_prediction.predictions(config.input, model, config.text_column, config.batch_size, config.actors, rows)
    started = time.perf_counter()
    written, files = batch_prediction.write_predictions(dataset, rows, config.output, config.overwrite)
    elapsed = time.perf_counter() - started
    console.stage("output", f"{written} rows in {files} files at {config.output} ({written / max(elapsed, 1e-9):.1f} rows/s)")
    return written, files


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("python -m pipelines.predict", __doc__, PredictConfig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = cli.from_namespace(PredictConfig, args)
    with console.session("predict", console.log_dir_for(config.storage), verbose=args.verbose):
        run_predict(config)
    return 0


def cli_entry() -> None:
    cli.run_main(main)


if __name__ == "__main__":
    cli_entry()
