"""MLflow tracking: where the store is, one run per training, and what goes into it.

The embedded default is a SQLite store plus an artifact folder under the storage
root. On a cluster, workers on other nodes cannot write a SQLite file on the
head, so `MLFLOW_TRACKING_URI` (or --tracking-uri) points at the MLflow server
that cluster.yaml starts. Only the driver and the Ray Train controller (both on
the head node) talk to MLflow; workers never do.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from pipelines import console
from pipelines.errors import ConfigError
from pipelines.storage import DEFAULT_STORAGE, is_remote, resolve

log = logging.getLogger(__name__)
LOCAL_STORE_DIR = "mlflow"
STEP_LOSS = "train/step_loss"
# what the training-curves picture draws
CURVE_KEYS = ("train/loss", "val/loss", STEP_LOSS, "val/accuracy", "val/f1")
INPUT_EXAMPLE = ["A moving story with wonderful acting.", "Dull, predictable and far too long."]


def local_store(storage: str) -> tuple[str, str]:
    """(tracking URI, artifact root) of the embedded SQLite store under a local storage root."""
    root = Path(resolve(storage).path) / LOCAL_STORE_DIR
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


# `mlflow.set_tracking_uri` also exports $MLFLOW_TRACKING_URI (for subprocesses). The value
# exported for a run that had no URI from the user is ours, not the user's choice: a later
# run in the same process (a notebook, a test session) with another --storage must not
# take it for one and log into the first run's store.
_exported_for_us: str | None = None


def users_tracking_uri() -> str | None:
    """$MLFLOW_TRACKING_URI as the user set it; None when unset or only MLflow's export for an earlier run here."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or None
    return None if uri is not None and uri == _exported_for_us else uri


def configure(storage: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """Point MLflow at --tracking-uri, else $MLFLOW_TRACKING_URI, else the local store.

    Returns (tracking URI, artifact root for new experiments or None for the server's own).
    """
    global _exported_for_us
    from_env = users_tracking_uri()
    uri = tracking_uri or from_env
    artifact_root = None
    if not uri:
        if is_remote(storage):
            # an object store cannot hold a SQLite file: the store goes to this machine's
            # cache (never the current directory), and the user is told so
            uri, artifact_root = local_store(DEFAULT_STORAGE)
            console.warn(
                f"no --tracking-uri or $MLFLOW_TRACKING_URI, so MLflow runs and models go to {uri} on this "
                "machine only; on a cluster, set MLFLOW_TRACKING_URI to the MLflow server"
            )
        else:
            uri, artifact_root = local_store(storage)
    elif uri.startswith("sqlite:///"):
        # a SQLite file named directly: its artifacts beside it, as for the embedded store
        # (MLflow's own default, ./mlruns, would land in whatever folder the user ran from)
        artifact_root = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _exported_for_us = None if from_env else uri
    return uri, artifact_root


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """An MLflow server or database that does not answer: one line now, not minutes of client retries then a traceback."""
    if uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        _check_database(uri)
        return
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"/health answered HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"/health answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise ConfigError(f"MLflow tracking server {uri}: not reachable ({problem}); is it up, and is MLFLOW_TRACKING_URI right?")


def _check_database(uri: str) -> None:
    """One connection attempt (MLflow's own store retries for about two minutes first)."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = sqlalchemy.create_engine(uri, pool_pre_ping=False)
        with engine.connect():
            pass
        engine.dispose()
    except (SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"MLflow tracking store {without_password(uri)}: cannot connect ({reason[:300]})") from exc


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
        raise ConfigError(f"MLflow tracking store {without_password(mlflow.get_tracking_uri())}: {first_line[:300]}") from exc


def without_password(uri: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db (safe to print)."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


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


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000  (then open http://127.0.0.1:5000)"


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


class MlflowEpochLogger(UserCallback):
    """Ray Train callback (runs in the Train controller): each report -> MLflow metrics at step=epoch.

    Logged as each epoch ends, so the UI shows a live curve and an interrupted run
    keeps what it learned.
    """

    def __init__(self, tracking_uri: str, run_id: str, board_name: str | None = None, epochs: int | None = None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.board_name = board_name
        self.epochs = epochs
        self._poster = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics:
            return
        rank_zero = metrics[0]
        step = int(rank_zero.get("epoch", 0))
        values = {k: v for k, v in numeric_metrics(rank_zero).items() if not k.startswith("test/") and k != "epoch"}
        try:
            client = MlflowClient(self.tracking_uri)
            for key, value in values.items():
                client.log_metric(self.run_id, key, value, step=step)
            log_step_curve(client, self.run_id, rank_zero.get("train/step_loss_curve") or [])
        except Exception as exc:  # a tracking outage must not kill training: the checkpoint holds the truth
            log.warning("could not log epoch %s metrics to MLflow at %s: %s", step, self.tracking_uri, exc)
        summary = ", ".join(
            f"{k} {rank_zero[k]:.4f}" for k in ("train/loss", "val/loss", "val/accuracy", "val/f1") if k in rank_zero
        )
        line = (
            f"[training] epoch {step}{f'/{self.epochs}' if self.epochs else ''}: {summary}, "
            f"{rank_zero.get('train/samples_per_s', 0):.1f} samples/s, data-wait {rank_zero.get('train/data_wait_fraction', 0):.0%}"
        )
        print(line, flush=True)  # the log file
        self._board().note(line)  # the console

    def _board(self):
        if self._poster is None:
            from pipelines.live_progress import Poster

            self._poster = Poster(self.board_name)
        return self._poster


def log_step_curve(client: MlflowClient, run_id: str, curve: list) -> None:
    """The per-step train loss of an epoch as `train/step_loss` at global optimizer steps."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(STEP_LOSS, float(loss), now, int(step)) for step, loss in curve]
    for start in range(0, len(metrics), 1000):  # log_batch takes at most 1000 metrics
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


# --- what a run shows in the UI: its data, pictures, description -------------------------

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


def log_run_report(run_id: str, final: dict, manifest, model: str, kind: str = "training run", history_run_id: str | None = None) -> dict:
    """PNG pictures (confusion matrix, curves, ROC/PR) and the run's description; returns ROC/PR metrics.

    `final`: the last report of the run's training (test/* keys, epoch, best_epoch);
    `history_run_id`: the run whose per-epoch metrics the curves draw (a sweep's best trial).
    """
    import tempfile

    from pipelines import reporting

    client = MlflowClient()
    extra: dict = {}
    step = int(final.get("epoch", 1))
    with tempfile.TemporaryDirectory(prefix="run-report-") as folder:
        pictures = [reporting.confusion_matrix_png(
            [[final.get("test/tn"), final.get("test/fp")], [final.get("test/fn"), final.get("test/tp")]], Path(folder) / "confusion_matrix.png"
        )]
        if final.get("test/score_hist_pos") is not None:
            extra = {f"test/{k}": v for k, v in reporting.roc_pr_png(final["test/score_hist_pos"], final["test/score_hist_neg"], Path(folder) / "roc_pr_curves.png").items()}
            pictures.append(Path(folder) / "roc_pr_curves.png")
            client.log_batch(run_id, metrics=[_metric(k, v, step) for k, v in extra.items() if v == v])  # NaN: undefined
        history = {key: [(m.step, m.value) for m in client.get_metric_history(history_run_id or run_id, key)] for key in CURVE_KEYS}
        one_epoch = len(history.get("val/loss", [])) <= 1
        steps = int(final.get("train/optimizer_steps") or 0) or None
        pictures.append(reporting.training_curves_png(history, Path(folder) / "training_curves.png", steps_per_epoch=steps if one_epoch else None))
        for picture in pictures:
            client.log_artifact(run_id, str(picture), "pictures")
    rows = {split: info.rows for split, info in manifest.splits.items()}
    description = reporting.run_description(
        model=model, dataset=f"{manifest.name}/{manifest.version}", dataset_uri=manifest.uri, rows=rows,
        epochs_run=int(final.get("epoch", 1)), best_epoch=int(final.get("best_epoch", final.get("epoch", 1))),
        metrics={**final, **extra}, stopped_early=bool(final.get("stopped_early")), kind=kind,
    )
    client.set_tag(run_id, "mlflow.note.content", description)
    return extra


def write_model_card(name: str, version: str, run_id: str, final: dict, manifest, model: str, decision, settings: dict) -> None:
    """The registered version's description: a short model card (data, scores, the gate, how to serve)."""
    from pipelines import reporting
    from pipelines.registry import CHAMPION

    card = reporting.model_card(
        name=name, version=version, run_id=run_id, model=model, dataset=f"{manifest.name}/{manifest.version}",
        dataset_uri=manifest.uri, dataset_hash=manifest.content_hash, metrics=final,
        gate_promoted=decision.promote if decision else None, gate_reason=decision.reason if decision else "not gated",
        best_epoch=int(final.get("best_epoch", final.get("epoch", 1))), settings=settings,
        serve_hint=f"python -m serve.app --model-name {name}  (serves @{CHAMPION}; or: make serve)",
        rows={split: info.rows for split, info in manifest.splits.items()},
    )
    MlflowClient().update_model_version(name, version, description=card)


def _metric(key: str, value: float, step: int):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


# --- the model a run registers ---------------------------------------------------------

def log_model(model_dir: str, tokenizer_path: str, register_as: str, settings, eval_texts: list[str], eval_labels: list[int]):
    """The model in `model_dir` as a pyfunc that carries its preprocessing and its ONNX/int8
    variants (pipelines.variants), each scored on `eval_texts`; registered, scores as version tags.

    Returns (ModelInfo, the variants' scores).
    """
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    from pipelines import pyfunc_model, variants

    with tempfile.TemporaryDirectory(prefix="register-") as scratch:
        folder = variants.build_model_folder(model_dir, tokenizer_path, settings, Path(scratch) / pyfunc_model.MODEL_ARTIFACT)
        texts, labels = variants.evaluation_sample(eval_texts, eval_labels)
        scores = variants.score_variants(folder, texts, labels)
        variants.save_scores(folder, scores)
        default = variants.default_backend(scores)
        signature = ModelSignature(
            inputs=Schema([ColSpec("string")]),  # unnamed: predict(["a review", ...]) works as is
            outputs=Schema([ColSpec("string", "label"), ColSpec("long", "label_id"), ColSpec("double", "score"),
                            *(ColSpec("double", f"probability_{label}") for label in settings.labels)]),
            params=ParamSchema([ParamSpec("backend", "string", default)]),
        )
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc_model.SentimentModel(),
            artifacts={pyfunc_model.MODEL_ARTIFACT: str(folder)},
            # the preprocessing's code goes with the model: `mlflow models serve` needs no checkout
            code_paths=[str(Path(__file__).parent)],
            signature=signature,
            input_example=INPUT_EXAMPLE,
            registered_model_name=register_as,
            pip_requirements=model_requirements(),
        )
    if info.registered_model_version:
        client = MlflowClient()
        for score in scores:
            for key, value in score.tags().items():
                client.set_model_version_tag(register_as, str(info.registered_model_version), key, value)
        client.set_model_version_tag(register_as, str(info.registered_model_version), "backend.default", default)
        client.set_model_version_tag(register_as, str(info.registered_model_version), "backend.eval_rows", str(len(texts)))
    return info, scores


def register_model(model_dir: str, tokenizer_path: str, register_as: str, manifest, max_length: int, truncation: str):
    """log_model with the run's preprocessing, scored on the dataset's test split; says so on the console."""
    from pipelines.datasets import read_split_table
    from pipelines.inference import InferenceSettings
    from pipelines.variants import MAX_EVAL_ROWS

    test = read_split_table(manifest, "test")
    # minutes on a CPU (export, quantization, three passes over the test sample): say what runs
    console.stage("registration", f"ONNX export and int8 quantization, then torch, onnx and onnx-int8 each scored on "
                                  f"{min(test.num_rows, MAX_EVAL_ROWS)} test reviews")
    info, scores = log_model(model_dir, tokenizer_path, register_as, InferenceSettings(max_length, truncation),
                             test.column("text").to_pylist(), test.column("label").to_pylist())
    console.stage("registration", "backends on {} test reviews: {}".format(scores[0].rows, "; ".join(
        f"{s.backend} accuracy {s.accuracy:.4f}, agreement {s.agreement:.3f}, {s.texts_per_s:.0f}/s{'' if s.usable else ' (unusable)'}" for s in scores)))
    return info


def model_requirements() -> list[str]:
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]  # a local tag (+cpu) is not on PyPI
    return [f"torch=={torch_version}", *(f"{name}=={version(name)}" for name in ("transformers", "tokenizers", "safetensors", "onnxruntime", "pandas", "numpy"))]


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


def upload_console_log(run_id: str, log_path: Path) -> None:
    """The job's log as the run's `console.log`; a failure to upload must not hide the run's own error."""
    import shutil
    import tempfile

    try:
        with tempfile.TemporaryDirectory(prefix="console-log-") as folder:
            copy = Path(folder) / "console.log"
            sys.stdout.flush()
            sys.stderr.flush()
            shutil.copyfile(log_path, copy)
            MlflowClient().log_artifact(run_id, str(copy))
    except Exception as exc:
        log.warning("could not upload %s to the MLflow run %s: %s", log_path, run_id, exc)


@contextmanager
def console_log():
    """The file that holds this job's output: the console session's log, or a tee of stdout/stderr."""
    if console.active():
        yield console.log_path()
        return
    import tempfile

    # the caller uploads the log inside this block (tracking.upload_console_log); then it goes
    with tempfile.TemporaryDirectory(prefix="train-log-") as folder, _tee(Path(folder) / "console.log") as path:
        yield path


@contextmanager
def _tee(path: Path):
    """Tee stdout/stderr into `path` (Ray forwards worker output through them), for in-process use."""

    class Tee:
        def __init__(self, stream, sink):
            self.stream, self.sink = stream, sink

        def write(self, text):
            self.sink.write(text)
            return self.stream.write(text)

        def flush(self):
            self.sink.flush()
            self.stream.flush()

        def __getattr__(self, name):
            return getattr(self.stream, name)

    with open(path, "a", encoding="utf-8") as sink:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(old[0], sink), Tee(old[1], sink)
        try:
            yield path
        finally:
            sys.stdout, sys.stderr = old
