"""The training job: dataset -> Ray Data -> Ray Train -> MLflow run -> registry + gate.

`run_training(TrainConfig)` is what `python -m pipelines.train_imdb` calls and
what the tests call. It reads top to bottom as the data flow: check what can be
checked before Ray starts (flags, the dataset, the model, a resume's settings),
size the run to the cluster (pipelines.cluster.runtime), tokenize (pipelines.training.feed),
train (pipelines.training.worker on every worker), record, register and gate
(pipelines.tracking.runs, pipelines.tracking.registry).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, replace

import mlflow
from mlflow.tracking import MlflowClient
from ray.data import DataContext
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines.cluster import runtime
from pipelines.core import console, progress, stopping
from pipelines.core.errors import DataError, PlatformError
from pipelines.core.storage import Location, resolve
from pipelines.data.datasets import Manifest, load_manifest
from pipelines.data.prepare import prepare_dataset
from pipelines.data.settings import PrepareConfig
from pipelines.text.model import resolve_model_path
from pipelines.text.tokenization import load_tokenizer
from pipelines.tracking import callbacks, registration, registry, reports, run_log, runs, store_uri
from pipelines.training import feed, leftovers, resources, run_settings
from pipelines.training.checkpoints import best_model_folder
from pipelines.training.settings import TrainConfig
from pipelines.training.worker import train_loop_per_worker

log = logging.getLogger(__name__)
SAMPLE_DATASET = "sample"
RUN_ID_FILE = "mlflow_run_id"


class TrainingFailed(PlatformError):
    """Training stopped with an error a person can act on."""


@dataclass(frozen=True)
class TrainingOutcome:
    run_id: str
    run_name: str
    metrics: dict
    model_uri: str
    registered_version: str | None
    gate: registry.GateDecision | None
    tracking_uri: str
    checkpoint_path: str


# --- before Ray: dataset and model -------------------------------------------------

def resolve_dataset(config: TrainConfig) -> Manifest:
    """--data imdb | sample | a path, to a manifest; prepares what can be prepared."""
    if config.data == "sample":
        return prepare_dataset(PrepareConfig(source="sample", storage=config.storage, name=SAMPLE_DATASET, progress=False)).manifest
    if config.data == "imdb":
        try:
            return load_manifest("imdb", storage=config.storage)
        except DataError:
            pass
        try:
            return prepare_dataset(PrepareConfig(source="imdb", storage=config.storage)).manifest
        except DataError as exc:
            raise DataError(
                f"IMDB is not prepared under {config.storage} and could not be prepared ({exc}). "
                "Offline, train on the built-in corpus with --data sample, or prepare a local copy first: "
                "python -m pipelines.prepare_imdb --source /path/to/aclImdb_v1.tar.gz"
            ) from exc
    return load_manifest(config.data, storage=config.storage)


# --- the trainer ---------------------------------------------------------------------

def build_loop_config(config: TrainConfig, manifest: Manifest, model_path: str, pad_token_id: int, num_threads: int) -> dict:
    """The dict every worker gets: TrainConfig's keys plus what the driver resolved."""
    loop_config = asdict(config)
    loop_config.update(
        model_path=model_path, pad_token_id=pad_token_id, num_threads=num_threads,
        **{f"{split}_rows": manifest.splits[split].rows for split in ("train", "val", "test")},
    )
    return loop_config


def build_trainer(loop_config: dict, datasets: dict, config: TrainConfig, use_gpu: bool, run_config: RunConfig) -> TorchTrainer:
    scaling = ScalingConfig(
        num_workers=config.num_workers,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        # Ray's soft strategies: a restart after a node is lost still finds room on the rest
        placement_strategy=config.placement.upper(),
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=feed.EvalSplitDataConfig(preserve_order=config.deterministic_data),
    )


def ray_run_config(config: TrainConfig, run_name: str, run_callbacks: list) -> RunConfig:
    return RunConfig(
        name=run_name,
        storage_path=resolve(config.storage).child("ray_results").uri,
        failure_config=FailureConfig(max_failures=config.max_failures),
        # the latest checkpoint is what resumes; one more survives a bad write
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=run_callbacks,
    )


# --- the job ------------------------------------------------------------------------

def new_run_name() -> str:
    return f"imdb-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def _run_id_marker(config: TrainConfig, run_name: str) -> Location:
    return _run_dir(config, run_name).child(RUN_ID_FILE)


def _start_mlflow_run(config: TrainConfig, run_name: str, experiment_id: str) -> str:
    """A new MLflow run, or on --resume the one the interrupted run started."""
    return runs.start_or_resume_run(
        _run_id_marker(config, run_name), resume=config.resume, experiment_id=experiment_id,
        run_name=run_name, kind="run", name_flag="--run-name", log_system_metrics=True,
    )


def _root_causes(exc: Exception) -> list[BaseException]:
    """The workers' own exceptions behind Ray Train's WorkerGroupError, else the error itself."""
    failures = getattr(exc, "worker_failures", None) or {}
    return list(failures.values()) or [getattr(exc, "controller_failure", None) or exc]


def _explain_failure(exc: Exception, config: TrainConfig) -> TrainingFailed:
    causes = _root_causes(exc)
    text = "\n".join(f"{type(cause).__name__}: {cause}" for cause in causes)
    if "out of memory" in text.lower() or "OutOfMemory" in type(exc).__name__ or "OutOfMemoryError" in text:
        return TrainingFailed(
            f"training ran out of memory (--batch-size {config.batch_size}, --max-length {config.max_length}): "
            "lower --max-length or --batch-size, or raise --grad-accum to keep the global batch"
        )
    # a worker's traceback text ends with its exception line: that is the message to show
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~"))), type(exc).__name__)
    return TrainingFailed(f"training failed (restarts allowed: {config.max_failures}): {last}")


def run_training(config: TrainConfig, loop_overrides: dict | None = None) -> TrainingOutcome:
    """Train, record and register; `loop_overrides` adds keys to the worker config (test hooks)."""
    # before the settings go anywhere (MLflow params, train_settings.json, checkpoints, workers)
    config = replace(config, tracking_uri=store_uri.take_credentials(config.tracking_uri))
    console.enter("data")
    resolve(config.storage).check_usable()  # a wrong endpoint, key or bucket: one line, before any work
    manifest = resolve_dataset(config)
    console.stage("data", describe_splits(manifest))
    console.enter("model")
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)  # fails here, before Ray, if the model is wrong
    console.stage("model", f"{model_name(config.model, model_path)}: max length {config.max_length} tokens, {config.truncation.replace('_', '+')} truncation")
    run_name = config.run_name or new_run_name()
    settings = run_settings.settings_of(config, f"{manifest.name}/{manifest.version}", manifest.content_hash)
    if config.resume:
        run_settings.check_resume(_run_dir(config, run_name), settings, run_name)
    tracking_uri, artifact_root = store_uri.configure(config.storage, config.tracking_uri)
    experiment_id = runs.ensure_experiment(config.experiment, artifact_root)

    console.enter("resources")
    runtime.init_ray(config.ray_address)
    with resources.requested_resources(config):
        cache = feed.should_cache_tokenized(config, manifest, runtime.alive_node_count(), runtime.object_store_bytes())
        plan = resources.plan_resources(config, tokenized_up_front=cache)
        console.stage("resources", plan.describe(config.num_workers))
        # Ray Data's per-operator bars would drown the job's own bars (pipelines.core.console)
        DataContext.get_current().enable_progress_bars = False
        loop_config = {**build_loop_config(config, manifest, model_path, tokenizer.pad_token_id, plan.threads_per_worker), **(loop_overrides or {})}
        _run_dir(config, run_name).makedirs()
        outcome = _train_in_mlflow_run(config, manifest, model_path, run_name, settings, tracking_uri, experiment_id, plan, cache, loop_config)
    _print_summary(outcome, config)
    return outcome


def describe_splits(manifest: Manifest) -> str:
    order = sorted(manifest.splits, key=lambda split: (["train", "val", "test"] + [split]).index(split))
    rows = " / ".join(f"{manifest.splits[split].rows} {split}" for split in order)
    return f"{manifest.name}/{manifest.version}: {rows} reviews ({manifest.uri})"


def model_name(model_flag: str | None, model_path: str) -> str:
    """What the person asked for: a hub id or folder, or the bundled default."""
    return model_flag or "all-MiniLM-L6-v2 (bundled)"


def _run_dir(config: TrainConfig, run_name: str) -> Location:
    return resolve(config.storage).child("ray_results", run_name)


def _train_in_mlflow_run(config, manifest, model_path, run_name, settings, tracking_uri, experiment_id, plan, cache, loop_config) -> TrainingOutcome:
    """Tokenize, train, record, register: in one MLflow run, which keeps the log even when a stage fails."""
    with run_log.console_log() as log_path:
        run_id = _start_mlflow_run(config, run_name, experiment_id)  # refuses a taken name without --resume
        run_settings.save(_run_dir(config, run_name), settings)  # what a later --resume is checked against
        try:
            _record_settings(config, manifest, model_path, run_name, plan)
            console.enter("tokenize")
            datasets = feed.training_datasets(manifest, model_path, config, plan.data, cache)
            console.stage("training", f"MLflow run {run_id} ({run_name})")
            with progress.board(run_name) as board_name:
                result = _fit(config, run_name, tracking_uri, run_id, plan, datasets, {**loop_config, "progress_board": board_name}, board_name)
            removed = leftovers.remove_unregistered_checkpoints(_run_dir(config, run_name))
            if removed:
                console.stage("training", f"removed {len(removed)} checkpoint folder(s) a lost worker left unreported: {', '.join(removed)}")
            outcome = _record_and_register(config, manifest, model_path, run_name, run_id, tracking_uri, result)
        except BaseException as exc:
            run_log.upload_console_log(run_id, log_path)  # a failed (or stopped) run keeps its log too
            mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        run_log.upload_console_log(run_id, log_path)
        mlflow.end_run()
    return outcome


def _record_settings(config: TrainConfig, manifest: Manifest, model_path: str, run_name: str, plan: resources.ResourcePlan) -> None:
    if config.resume:
        mlflow.set_tag("resumed_with_epochs", str(config.epochs))  # params are write-once; --epochs may rise
    else:
        mlflow.log_params(runs.flat_params({
            **asdict(config), "model_path": model_path, "use_gpu_resolved": plan.use_gpu,
            "threads_per_worker_resolved": plan.threads_per_worker, "tokenized_up_front": plan.tokenized_up_front,
            "data_resources": plan.data.as_dict(),
        }))
        runs.log_dataset_inputs(manifest)
    mlflow.set_tags(
        {
            **runs.environment_tags(),
            "dataset": f"{manifest.name}/{manifest.version}",
            "dataset_content_hash": manifest.content_hash,
            "dataset_uri": manifest.uri,
            "ray_run_name": run_name,
        }
    )


def _fit(config, run_name, tracking_uri, run_id, plan, datasets, loop_config, board_name=None):
    run_callbacks = [callbacks.MlflowEpochLogger(tracking_uri, run_id, board_name, config.epochs)]
    trainer = build_trainer(loop_config, datasets, config, plan.use_gpu, ray_run_config(config, run_name, run_callbacks))
    try:
        # fit() answers Ctrl-C (and so SIGTERM: pipelines.core.stopping) by aborting the run's
        # workers, then exits 0 through SystemExit; its handler stays installed after it
        with stopping.kept_handlers():
            result = trainer.fit()
    except SystemExit as exc:
        raise KeyboardInterrupt("training aborted") from exc
    except Exception as exc:  # Ray wraps worker errors in TrainingFailedError
        raise _explain_failure(exc, config) from exc
    if result.checkpoint is None:
        raise TrainingFailed("training finished without a checkpoint; nothing to register")
    return result


def _record_and_register(config, manifest, model_path, run_name, run_id, tracking_uri, result) -> TrainingOutcome:
    """Test results into the run; the best epoch's model logged, registered and gated."""
    final = dict(result.metrics)
    runs.log_test_results(final, manifest.to_json(), step=int(final.get("epoch", config.epochs)))
    final.update(reports.log_run_report(run_id, final, manifest, model_name(config.model, model_path).split(" (")[0]))
    best_epoch = int(final.get("best_epoch", final.get("epoch", config.epochs)))
    mlflow.set_tags({"best_epoch": str(best_epoch), "stopped_early": str(bool(final.get("stopped_early")))})
    with result.checkpoint.as_directory() as checkpoint_dir:
        model_info = registration.register_model(str(best_model_folder(checkpoint_dir)), model_path, config.register_as, manifest, config.max_length,
                                                config.truncation, config.onnx_variants, source=resolve(config.storage).uri_of(result.checkpoint.path))
    version = model_info.registered_model_version
    console.enter("registration")
    decision = None
    if version:
        client = MlflowClient()

        def record(decision: registry.GateDecision) -> None:
            """The version's record, complete before the alias may move to it."""
            client.set_model_version_tag(config.register_as, version, "best_epoch", str(best_epoch))
            reports.write_model_card(config.register_as, version, run_id, final, manifest, model_name(config.model, model_path).split(" (")[0],
                                     decision, asdict(config))

        mlflow.set_tags({"registered_model": config.register_as, "registered_version": version})
        try:
            decision = registry.apply_gate(client, config.register_as, version, config.promote, float(final["test/accuracy"]),
                                           manifest.content_hash, before_promotion=record)
        except registry.GateError:
            mlflow.set_tag("gate.decision", registry.ERROR)
            raise
        mlflow.set_tag("gate.decision", registry.PROMOTED if decision.promote else registry.KEPT)
        verdict = f"promoted to @{registry.CHAMPION}" if decision.promote else f"@{registry.CHAMPION} unchanged"
        console.stage("registration", f"models:/{config.register_as}/{version}: {verdict} ({decision.reason})")
    return TrainingOutcome(
        run_id=run_id,
        run_name=run_name,
        metrics=final,
        model_uri=model_info.model_uri,
        registered_version=version,
        gate=decision,
        tracking_uri=tracking_uri,
        checkpoint_path=resolve(config.storage).uri_of(result.checkpoint.path),
    )


def _print_summary(outcome: TrainingOutcome, config: TrainConfig) -> None:
    m = outcome.metrics
    lines = [
        "",
        "=== training finished ===",
        f"test (the model of epoch {m.get('best_epoch', m.get('epoch', '?'))}{', stopped early' if m.get('stopped_early') else ''}): "
        f"accuracy {m.get('test/accuracy', float('nan')):.4f}  f1 {m.get('test/f1', float('nan')):.4f}  "
        f"loss {m.get('test/loss', float('nan')):.4f}  on {m.get('test/rows', '?')} reviews",
        f"confusion (rows true neg/pos, cols predicted neg/pos): [[{m.get('test/tn')}, {m.get('test/fp')}], [{m.get('test/fn')}, {m.get('test/tp')}]]",
    ]
    if config.data == "sample":
        lines.append("note: the sample corpus is synthetic; this accuracy says nothing about IMDB")
    lines += [
        f"MLflow run: {outcome.run_id} (experiment {config.experiment!r}, run name {outcome.run_name})",
        f"model: {outcome.model_uri}",
    ]
    if outcome.registered_version:
        gate = outcome.gate
        verdict = "promoted to @champion" if gate and gate.promote else "not promoted; @champion unchanged"
        lines.append(f"registered: models:/{config.register_as}/{outcome.registered_version} ({verdict}: {gate.reason if gate else ''})")
        lines.append(f"serve it: models:/{config.register_as}@{registry.CHAMPION}")
    lines += [f"checkpoint: {outcome.checkpoint_path}", f"MLflow UI: {store_uri.ui_command(outcome.tracking_uri)}"]
    for line in lines:
        console.say(line)
    log.debug("final metrics: %s", json.dumps(m, default=str))
