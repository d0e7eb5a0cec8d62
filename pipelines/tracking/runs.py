"""One MLflow run per training: its experiment, start or resume, tags, params and metrics.

Only the driver and the Ray Train controller (both on the head node) talk to MLflow;
workers never do.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.core.errors import ConfigError
from pipelines.core.credentials import mask

STEP_LOSS = "train/step_loss"
# what the training-curves picture draws
CURVE_KEYS = ("train/loss", "val/loss", STEP_LOSS, "val/accuracy", "val/f1")


def ensure_experiment(name: str, artifact_root: str | None) -> str:
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    try:
        client = MlflowClient()
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        location = f"{artifact_root}/{name}" if artifact_root else None
        return client.create_experiment(name, artifact_location=location)
    except (MlflowException, SQLAlchemyError) as exc:
        # a database URI used directly (postgresql://...) that refuses us, a server in trouble
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"MLflow tracking store {mask(mlflow.get_tracking_uri())}: {first_line[:300]}") from exc


def start_or_resume_run(marker, *, resume: bool, experiment_id: str, run_name: str, kind: str, name_flag: str, log_system_metrics: bool = False) -> str:
    """Start the MLflow run of a new job, or on --resume reopen the one it started.

    `marker` (a storage Location beside the job's Ray results) holds the run id, so a
    resumed job keeps one MLflow run. Reusing a name without --resume is refused:
    Ray would otherwise silently continue the old job.
    """
    if resume:
        if not marker.exists():
            raise ConfigError(f"--resume: no {kind} named {run_name!r} (no {marker.uri})")
        run_id = marker.read_text().strip()
        mlflow.start_run(run_id=run_id, log_system_metrics=log_system_metrics)
        return run_id
    if marker.exists():
        raise ConfigError(f"{name_flag} {run_name!r} exists already; pass --resume to continue it, or pick a new name")
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name, log_system_metrics=log_system_metrics)
    marker.write_text(run.info.run_id + "\n")
    return run.info.run_id


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_tags() -> dict[str, str]:
    import ray
    import torch
    import transformers

    return {
        "git_commit": git_commit(),
        "ray_version": ray.__version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
    }


def flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """MLflow params are flat strings of at most 6000 chars."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)[:6000]
    return flat


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_step_curve(client: MlflowClient, run_id: str, curve: list) -> None:
    """The per-step train loss of an epoch as `train/step_loss` at global optimizer steps."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(STEP_LOSS, float(loss), now, int(step)) for step, loss in curve]
    for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def log_dataset_inputs(manifest) -> None:
    """Each split as an MLflow dataset input (Datasets in the UI; lineage from the model version)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types import ColSpec, Schema

    schema = Schema([ColSpec("string", "text"), ColSpec("long", "label")])
    for split, context in (("train", "training"), ("val", "validation"), ("test", "test")):
        if split not in manifest.splits:
            continue
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(manifest.root.child(split).uri if manifest.root else manifest.uri)
        digest = hashlib.sha256(f"{manifest.content_hash}:{split}".encode()).hexdigest()[:10]
        dataset = MetaDataset(source=source, name=f"{manifest.name}/{manifest.version}:{split}", digest=digest, schema=schema)
        mlflow.log_input(dataset, context=context, tags={"rows": str(manifest.splits[split].rows)})


def metric_entity(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


def log_test_results(final: dict, manifest_json: dict, step: int) -> None:
    """Test metrics at the run's last step, the confusion matrix, and the dataset's manifest."""
    mlflow.log_metrics(numeric_metrics({k: v for k, v in final.items() if k.startswith("test/")}), step=step)
    confusion = {
        "labels": ["negative", "positive"],
        "matrix": [[final.get("test/tn"), final.get("test/fp")], [final.get("test/fn"), final.get("test/tp")]],
        "rows_are": "true label",
        "columns_are": "predicted label",
    }
    mlflow.log_dict(confusion, "confusion_matrix.json")
    mlflow.log_dict(manifest_json, "dataset_manifest.json")
