"""`python -m pipelines.evaluate`: score a registered model on labelled reviews; an MLflow run records it.

Examples:
    python -m pipelines.evaluate                                     # @champion on the sample test split
    python -m pipelines.evaluate --model models:/imdb-sentiment/3 --data imdb --split test --backend onnx-int8
    python -m pipelines.evaluate --data s3://bucket/labelled/2026-11/ # any Parquet with text and label columns

The run (experiment `imdb-sentiment-evaluations`) names the model version (tags and, in
MLflow 3, metrics linked to its logged model), records the data as a dataset input, its
metrics (accuracy, precision, recall, F1, ROC AUC, average precision, rows/s) and
pictures (confusion matrix, ROC / precision-recall), and the version gets a tag
`evaluation.<data>.accuracy` pointing at the run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.cluster import runtime
from pipelines.core import cli, console
from pipelines.core.cli import field
from pipelines.core.errors import ConfigError, DataError
from pipelines.core.storage import default_storage
from pipelines.inference import batch_prediction
from pipelines.tracking import report_content, runs, store_uri

EXPERIMENT = "imdb-sentiment-evaluations"


@dataclass(frozen=True)
class EvaluateConfig:
    """Evaluate a registered model on labelled reviews, with Ray Data; log an MLflow evaluation run."""

    model: str = field("models:/imdb-sentiment@champion", "registered model: models:/<name>@<alias> or models:/<name>/<version>")
    data: str = field("sample", "a prepared dataset ('imdb', 'sample', a dataset folder or manifest.json) or Parquet file(s) with text and label columns")
    split: str = field("test", "the prepared dataset's split to evaluate on")
    backend: str = field("auto", "inference backend: auto (the version's default), torch, onnx or onnx-int8")
    batch_size: int = field(64, "texts per model call")
    actors: int | None = field(None, "model replicas (Ray Data actors) scoring in parallel (default: one per CPU, one thread each, at most one per input file)")
    experiment: str = field(EXPERIMENT, "MLflow experiment of the evaluation runs")
    storage: str = field(default_storage(), "storage root (datasets, and the local MLflow store without a tracking URI)")
    tracking_uri: str | None = field(None, "MLflow tracking/registry URI (default: $MLFLOW_TRACKING_URI, else the store under --storage)")
    ray_address: str | None = field(None, "Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")

    def __post_init__(self) -> None:
        if self.batch_size < 1 or (self.actors is not None and self.actors < 1):
            raise ConfigError("--batch-size and --actors must be at least 1")


@dataclass
class EvaluationOutcome:
    run_id: str
    model_uri: str
    backend: str
    metrics: dict


def labelled_input(config: EvaluateConfig):
    """(files' URI for Ray Data, a manifest or None, a short name): a prepared split or Parquet given directly."""
    from pipelines.data.datasets import load_manifest

    looks_like_parquet = config.data.endswith(".parquet") or "://" in config.data and not config.data.endswith("manifest.json")
    if not looks_like_parquet:
        try:
            manifest = load_manifest(config.data, storage=config.storage)
        except DataError:
            if Path(config.data).expanduser().is_dir():
                return config.data, None, Path(config.data).name
            raise
        if config.split not in manifest.splits:
            raise ConfigError(f"--split {config.split!r}: {manifest.name}/{manifest.version} has {', '.join(manifest.splits)}")
        return manifest.root.child(config.split).uri, manifest, f"{manifest.name}/{manifest.version}:{config.split}"
    return config.data, None, config.data.rstrip("/").rsplit("/", 1)[-1]


def score(tables) -> tuple[dict, list[int], list[int]]:
    """Metrics over all rows: counts, accuracy, precision, recall, F1, and score histograms."""
    from pipelines.training.metrics import metrics_from_counts

    truth, predicted, positive = [], [], []
    for table in tables:
        if "label" not in table.column_names:
            raise DataError("no 'label' column: evaluation needs the true labels (0 negative, 1 positive)")
        truth += [int(v) for v in table.column("label").to_pylist()]
        predicted += table.column("predicted_label_id").to_pylist()
        positive += table.column("probability_positive").to_pylist()
    y, p = np.asarray(truth), np.asarray(predicted)
    counts = [0.0, float(len(y)), float(((p == 1) & (y == 1)).sum()), float(((p == 1) & (y == 0)).sum()),
              float(((p == 0) & (y == 1)).sum()), float(((p == 0) & (y == 0)).sum())]
    metrics = {k: v for k, v in metrics_from_counts(counts).items() if k != "loss"}
    hist_pos, hist_neg = report_content.score_histograms(np.asarray(positive, dtype=float), y)
    return metrics, hist_pos, hist_neg


def run_evaluation(config: EvaluateConfig) -> EvaluationOutcome:
    import mlflow
    from mlflow.tracking import MlflowClient

    console.enter("model")
    tracking_uri, artifact_root = store_uri.configure(config.storage, config.tracking_uri)
    model = batch_prediction.resolve_model(config.model, tracking_uri, config.backend)
    console.stage("model", f"{model.uri}{'' if config.model == model.uri else f' ({config.model})'}, backend {model.backend}")
    console.enter("data")
    files_uri, manifest, data_name = labelled_input(config)
    rows = batch_prediction.rows_of(files_uri)
    console.stage("data", f"{data_name}: {rows} labelled reviews")
    console.enter("evaluate")
    runtime.init_ray(config.ray_address)
    dataset = batch_prediction.predictions(files_uri, model, "text", config.batch_size, config.actors, rows)
    started = time.perf_counter()
    metrics, hist_pos, hist_neg = score(batch_prediction.iter_tables(dataset, rows, "evaluate"))
    metrics["rows_per_s"] = metrics["rows"] / max(time.perf_counter() - started, 1e-9)

    experiment_id = runs.ensure_experiment(config.experiment, artifact_root)
    client = MlflowClient()
    version = client.get_model_version(model.name, model.version)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"eval-{model.name}-v{model.version}") as run:
        mlflow.log_params({"model_uri": model.uri, "model_requested": config.model, "backend": model.backend, "data": data_name, "rows": rows})
        mlflow.set_tags({"model_name": model.name, "model_version": model.version, "evaluation_of": model.uri})
        if manifest is not None:
            runs.log_dataset_inputs(manifest)
        with tempfile.TemporaryDirectory(prefix="evaluation-") as folder:
            metrics.update({k: v for k, v in report_content.roc_pr_png(hist_pos, hist_neg, Path(folder) / "roc_pr_curves.png").items()})
            report_content.confusion_matrix_png([[metrics["tn"], metrics["fp"]], [metrics["fn"], metrics["tp"]]], Path(folder) / "confusion_matrix.png",
                                           title=f"{model.name} v{model.version} on {data_name}")
            mlflow.log_artifacts(folder, "pictures")
        numeric = {f"eval/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}
        model_id = getattr(version, "model_id", None)
        mlflow.log_metrics(numeric, **({"model_id": model_id} if model_id else {}))
        mlflow.set_tag("mlflow.note.content", (
            f"**Evaluation** of `{model.uri}` (backend {model.backend}) on `{data_name}` ({rows} reviews): "
            f"accuracy **{metrics['accuracy']:.4f}**, F1 {metrics['f1']:.4f}, ROC AUC {metrics.get('roc_auc', float('nan')):.4f}."
        ))
    client.set_model_version_tag(model.name, model.version, f"evaluation.{data_name.replace(':', '.').replace('/', '.')}.accuracy", f"{metrics['accuracy']:.4f}")
    client.set_model_version_tag(model.name, model.version, "evaluation.last_run", run.info.run_id)
    console.stage("result", f"accuracy {metrics['accuracy']:.4f}, F1 {metrics['f1']:.4f}, ROC AUC {metrics.get('roc_auc', float('nan')):.4f} "
                            f"on {metrics['rows']} reviews ({metrics['rows_per_s']:.1f}/s); MLflow run {run.info.run_id}")
    return EvaluationOutcome(run.info.run_id, model.uri, model.backend, metrics)


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser("python -m pipelines.evaluate", __doc__, EvaluateConfig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = cli.from_namespace(EvaluateConfig, args)
    with console.session("evaluate", console.log_dir_for(config.storage), verbose=args.verbose):
        run_evaluation(config)
    return 0


def cli_entry() -> None:
    cli.run_main(main)


if __name__ == "__main__":
    cli_entry()
