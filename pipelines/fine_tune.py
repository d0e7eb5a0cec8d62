"""The training job: dataset -> Ray Data -> Ray Train -> MLflow run -> registry + gate.

`run_training(TrainConfig)` is what `python -m pipelines.train_imdb` calls and
what the tests call. It checks everything it can before Ray starts (flags, the
dataset, the model), then sizes the run to the cluster, trains, and records.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.tracking import MlflowClient
from ray.data import DataContext
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from pipelines import registry, runtime, tracking
from pipelines.config import PrepareConfig, TrainConfig
from pipelines.datasets import Manifest, load_manifest
from pipelines.errors import ConfigError, DataError, PlatformError
from pipelines.model import resolve_model_path
from pipelines.prepare import prepare_dataset
from pipelines.storage import resolve
from pipelines.streaming import DataResources, tokenized_splits
from pipelines.tokenization import TokenizerSettings, load_tokenizer
from pipelines.training import train_loop_per_worker

log = logging.getLogger(__name__)
SAMPLE_DATASET = "sample"
RUN_ID_FILE = "mlflow_run_id"
# CPUs left free for Ray Data next to the Train workers (tokenizer actors, reads): three
# splits' actors at 0.25 + reads at 0.1; without them the run hangs in backpressure.
DATA_CPU_RESERVE = 0.6
INPUT_EXAMPLE = ["A moving story with wonderful acting.", "Dull, predictable and far too long."]


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


# --- sizing the run to the cluster --------------------------------------------------

def wants_gpus(config: TrainConfig) -> bool:
    """--use-gpu yes, or auto on a cluster whose node types can add GPUs for every worker."""
    if config.use_gpu != "auto":
        return config.use_gpu == "yes"
    if runtime.cluster_gpus() >= config.num_workers:
        return True
    possible = runtime.autoscaler_max_gpus()
    return possible is not None and possible >= config.num_workers


@contextmanager
def requested_resources(config: TrainConfig) -> Iterator[None]:
    """On an autoscaling cluster (`ray up`, KubeRay): ask for the workers' resources, wait, withdraw at the end.

    GPU worker types start at 0 nodes: without this request the checks of
    plan_resources would refuse a run that the autoscaler could have served, and
    --use-gpu auto would train on CPUs because no GPU node happened to be up. Local
    clusters cannot grow: they fail at once with the numbers.
    """
    if not (config.ray_address or os.environ.get("RAY_ADDRESS")) or runtime.is_local_cluster():
        yield
        return
    gpus_wanted = config.num_workers if wants_gpus(config) else 0
    bundle = {"CPU": config.cpus_per_worker, **({"GPU": 1} if gpus_wanted else {})}

    def ready() -> bool:
        return (runtime.cluster_cpus() >= config.num_workers * config.cpus_per_worker + DATA_CPU_RESERVE
                and runtime.cluster_gpus() >= gpus_wanted)

    what = f"{config.num_workers} worker(s) of {bundle}"
    with runtime.autoscaler_request([bundle] * config.num_workers, ready, what, float(os.environ.get("PLATFORM_RESOURCE_WAIT_S", "900"))):
        yield


def plan_resources(config: TrainConfig) -> tuple[bool, DataResources]:
    """(use GPUs?, data pipeline sizing); errors if the workers cannot fit.

    Call it inside `requested_resources(config)` on an autoscaling cluster.
    """
    cpus, gpus = runtime.cluster_cpus(), runtime.cluster_gpus()
    use_gpu = {"yes": True, "no": False, "auto": gpus >= config.num_workers}[config.use_gpu]
    if use_gpu and gpus < config.num_workers:
        raise ConfigError(f"--use-gpu yes with --num-workers {config.num_workers}, but the cluster has {gpus:g} GPUs")
    needed = config.num_workers * config.cpus_per_worker
    if needed + DATA_CPU_RESERVE > cpus + 1e-9:
        raise ConfigError(
            f"--num-workers {config.num_workers} x --cpus-per-worker {config.cpus_per_worker:g} = {needed:g} CPUs, "
            f"but the cluster has {cpus:g} and the data pipeline needs ~{DATA_CPU_RESERVE} more: lower one of them"
        )
    return use_gpu, DataResources.for_cluster(cpus - needed)


class EvalSplitDataConfig(DataConfig):
    """Shard train equally (DDP steps stay in lockstep), and val/test without dropping rows.

    `streaming_split(equal=True)` may drop up to world_size-1 rows to even out the
    shards; for evaluation every row must count once, so those splits use equal=False
    and the loop sums counts over workers.

    `preserve_order`: rows reach the workers in the order of the shards, not in the
    order blocks happen to finish; a rerun (or the same trial in two sweeps) then sees
    the same batches. With several workers, which worker gets which block still
    depends on timing.
    """

    def __init__(self, preserve_order: bool = True):
        super().__init__()
        self.preserve_order = preserve_order

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        output = [{} for _ in range(world_size)]
        for name, dataset in datasets.items():
            dataset = dataset.copy(dataset)
            options = self._resolve_execution_options(name)
            options.preserve_order = options.preserve_order or self.preserve_order
            dataset.context.execution_options = options
            for rank, split in enumerate(dataset.streaming_split(world_size, equal=(name == "train"), locality_hints=worker_node_ids)):
                output[rank][name] = split
        return output


# --cache-tokenized auto: cache when the token ids fill under this share of the object store
CACHE_STORE_FRACTION = 0.10
# bytes per token in the object store: int32 ids plus Arrow offsets and block overhead
CACHE_BYTES_PER_TOKEN = 6


def should_cache_tokenized(config: TrainConfig, manifest: Manifest) -> bool:
    if config.cache_tokenized != "auto":
        if config.cache_tokenized == "yes" and runtime.alive_node_count() > 1:
            log.warning("--cache-tokenized yes on a multi-node cluster: a node lost mid-run takes its cached blocks "
                        "with it and the run cannot resume (use auto or no to stream instead)")
        return config.cache_tokenized == "yes"
    if runtime.alive_node_count() > 1:
        # cached blocks live in the object store of the node that made them; when that node
        # is lost, Ray Data cannot rebuild them (seen in the cluster rehearsal: restarted
        # workers fail with ReferenceCountingAssertionError), so a cluster streams instead
        return False
    rows = sum(info.rows for info in manifest.splits.values())
    needed = rows * config.max_length * CACHE_BYTES_PER_TOKEN  # an upper bound: most reviews are shorter
    return needed < CACHE_STORE_FRACTION * runtime.object_store_bytes()


def training_datasets(manifest: Manifest, model_path: str, config: TrainConfig, resources: DataResources) -> dict:
    """The tokenized train/val/test Datasets a run (or a Tune trial) trains on."""
    return tokenized_splits(
        manifest,
        TokenizerSettings(model_path, config.max_length, config.truncation),
        resources=resources,
        group_by_length_batch_size=config.per_worker_batch_size if config.group_by_length else None,
        seed=config.seed,
        cache=should_cache_tokenized(config, manifest),
    )


def build_loop_config(config: TrainConfig, manifest: Manifest, model_path: str, pad_token_id: int) -> dict:
    """The dict every worker gets: TrainConfig's keys plus what the driver resolved."""
    loop_config = asdict(config)
    loop_config.update(
        model_path=model_path,
        pad_token_id=pad_token_id,
        train_rows=manifest.splits["train"].rows,
        num_threads=config.threads_per_worker or max(1, int(config.cpus_per_worker)),
    )
    return loop_config


def build_trainer(loop_config: dict, datasets: dict, config: TrainConfig, use_gpu: bool, run_config: RunConfig) -> TorchTrainer:
    scaling = ScalingConfig(
        num_workers=config.num_workers,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
    )
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config,
        datasets=datasets,
        dataset_config=EvalSplitDataConfig(preserve_order=config.deterministic_data),
    )


def ray_run_config(config: TrainConfig, run_name: str, callbacks: list) -> RunConfig:
    return RunConfig(
        name=run_name,
        storage_path=resolve(config.storage).child("ray_results").uri,
        failure_config=FailureConfig(max_failures=config.max_failures),
        # the latest checkpoint is what resumes; one more survives a bad write
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        callbacks=callbacks,
    )


# --- the job ------------------------------------------------------------------------

def new_run_name() -> str:
    return f"imdb-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@contextmanager
def console_log(path: Path):
    """Tee stdout/stderr into `path` (Ray forwards worker output through them)."""

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


def _run_id_marker(config: TrainConfig, run_name: str):
    return resolve(config.storage).child("ray_results", run_name, RUN_ID_FILE)


def _start_mlflow_run(config: TrainConfig, run_name: str, experiment_id: str) -> str:
    """A new MLflow run, or on --resume the one the interrupted run started."""
    return tracking.start_or_resume_run(
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


def log_model(checkpoint_dir: str, model_path: str, config: TrainConfig):
    """The final model + tokenizer, as an MLflow transformers model Serve can load; registered."""
    import mlflow.transformers
    from mlflow.models import infer_signature

    from pipelines.model import load_classifier

    model = load_classifier(checkpoint_dir)
    tokenizer = load_tokenizer(model_path)
    signature = infer_signature(INPUT_EXAMPLE, [{"label": "positive", "score": 0.9}] * len(INPUT_EXAMPLE))
    return mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer},
        name="model",
        task="text-classification",
        signature=signature,
        input_example=INPUT_EXAMPLE,
        registered_model_name=config.register_as,
        # mlflow's inferred requirements add torchvision, which this model never imports
        pip_requirements=model_requirements(),
    )


def model_requirements() -> list[str]:
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]  # a local tag (+cpu) is not on PyPI
    return [f"torch=={torch_version}", *(f"{name}=={version(name)}" for name in ("transformers", "tokenizers", "safetensors"))]


def run_training(config: TrainConfig, loop_overrides: dict | None = None) -> TrainingOutcome:
    """Train, record and register; `loop_overrides` adds keys to the worker config (test hooks)."""
    resolve(config.storage).check_usable()  # a wrong endpoint, key or bucket: one line, before any work
    manifest = resolve_dataset(config)
    model_path = resolve_model_path(config.model)
    tokenizer = load_tokenizer(model_path)  # fails here, before Ray, if the model is wrong
    tracking_uri, artifact_root = tracking.configure(config.storage, config.tracking_uri)
    experiment_id = tracking.ensure_experiment(config.experiment, artifact_root)

    runtime.init_ray(config.ray_address)
    with requested_resources(config):
        outcome = _train_on_cluster(config, manifest, model_path, tokenizer, tracking_uri, experiment_id, loop_overrides)
    _print_summary(outcome, config)
    return outcome


def _train_on_cluster(config, manifest, model_path, tokenizer, tracking_uri, experiment_id, loop_overrides) -> TrainingOutcome:
    use_gpu, data_resources = plan_resources(config)
    # Ray Data's per-operator bars would drown the training's own progress lines
    DataContext.get_current().enable_progress_bars = False
    datasets = training_datasets(manifest, model_path, config, data_resources)
    run_name = config.run_name or new_run_name()
    resolve(config.storage).child("ray_results", run_name).makedirs()
    log_dir = Path(tempfile.mkdtemp(prefix="train-log-"))
    with console_log(log_dir / "console.log") as log_path:
        run_id = _start_mlflow_run(config, run_name, experiment_id)
        try:
            outcome = _train_and_record(
                config, manifest, model_path, tokenizer, run_name, run_id, tracking_uri, use_gpu, datasets, data_resources, loop_overrides or {}
            )
        except BaseException:
            mlflow.end_run(status="FAILED")
            raise
        finally:
            if mlflow.active_run():
                mlflow.log_artifact(str(log_path))
        mlflow.end_run()
    return outcome


def _train_and_record(
    config, manifest, model_path, tokenizer, run_name, run_id, tracking_uri, use_gpu, datasets, data_resources, loop_overrides
) -> TrainingOutcome:
    if not config.resume:
        mlflow.log_params(tracking.flat_params({**asdict(config), "model_path": model_path, "use_gpu_resolved": use_gpu, "data_resources": data_resources.as_dict()}))
    mlflow.set_tags(
        {
            **tracking.environment_tags(),
            "dataset": f"{manifest.name}/{manifest.version}",
            "dataset_content_hash": manifest.content_hash,
            "dataset_uri": manifest.uri,
            "ray_run_name": run_name,
        }
    )
    loop_config = {**build_loop_config(config, manifest, model_path, tokenizer.pad_token_id), **loop_overrides}
    callbacks = [tracking.MlflowEpochLogger(tracking_uri, run_id)]
    trainer = build_trainer(loop_config, datasets, config, use_gpu, ray_run_config(config, run_name, callbacks))
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps worker errors in TrainingFailedError
        raise _explain_failure(exc, config) from exc
    if result.checkpoint is None:
        raise TrainingFailed("training finished without a checkpoint; nothing to register")
    final = dict(result.metrics)
    test_metrics = {k: v for k, v in final.items() if k.startswith("test/")}
    mlflow.log_metrics(tracking.numeric_metrics(test_metrics), step=config.epochs)
    confusion = {
        "labels": ["negative", "positive"],
        "matrix": [[final.get("test/tn"), final.get("test/fp")], [final.get("test/fn"), final.get("test/tp")]],
        "rows_are": "true label",
        "columns_are": "predicted label",
    }
    mlflow.log_dict(confusion, "confusion_matrix.json")
    mlflow.log_dict(manifest.to_json(), "dataset_manifest.json")
    with result.checkpoint.as_directory() as checkpoint_dir:
        model_info = log_model(checkpoint_dir, model_path, config)
    version = str(model_info.registered_model_version) if model_info.registered_model_version else None
    decision = None
    if version:
        decision = registry.apply_gate(
            MlflowClient(), config.register_as, version, config.promote, float(final["test/accuracy"]), manifest.content_hash
        )
        mlflow.set_tags({"registered_model": config.register_as, "registered_version": version, "gate.decision": "promoted" if decision.promote else "kept_champion"})
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
        f"test: accuracy {m.get('test/accuracy', float('nan')):.4f}  f1 {m.get('test/f1', float('nan')):.4f}  "
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
    lines += [f"checkpoint: {outcome.checkpoint_path}", f"MLflow UI: {tracking.ui_command(outcome.tracking_uri)}"]
    print("\n".join(lines), flush=True)
    log.debug("final metrics: %s", json.dumps(m, default=str))
