"""Score Parquet reviews with a registered model on Ray Data: the same classifier Serve runs.

`predictions(...)` streams `read_parquet` -> `map_batches(PredictBatch)` on an actor
pool; each actor downloads the model version once and runs `pipelines.inference.classifier`
(the training's cleaning, truncation and max length, with the chosen backend).
`write_predictions` commits its output all at once (pipelines.core.committed_parts): the
parts are staged, moved in beside the previous result, and `_SUCCESS`, which lists them, is
replaced last; then the previous result goes. A run that fails or is killed leaves the
previous result readable, and readers take the parts `_SUCCESS` lists.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from pipelines.core import console
from pipelines.core.committed_parts import visible_parquet_files, write_committed
from pipelines.core.errors import ConfigError, DataError
from pipelines.core.storage import Location, resolve
from pipelines.data.reading import file_list_reader

log = logging.getLogger(__name__)
READ_CPUS = 0.25  # Parquet read tasks: I/O, next to model actors that take the rest
# Rows an actor scores per call at most: several seconds of a CPU model's work (MiniLM int8 scores
# about 100 review-length texts a second per core), so that what each call costs Ray Data (a
# task, its block stored, handed over and counted) stays small beside it
MAX_ROWS_PER_CALL = 512
# appended to the input's columns (which often hold the true `label`: never overwritten)
PREDICTION_COLUMNS = ("predicted_label", "predicted_label_id", "score")


@dataclass(frozen=True)
class ModelRef:
    """A registered version, resolved once on the driver (an alias may move during the job)."""

    name: str
    version: str
    uri: str  # models:/<name>/<version>
    tracking_uri: str
    backend: str  # resolved: the version's default unless asked otherwise


def resolve_model(model_uri: str, tracking_uri: str, backend: str = "auto") -> ModelRef:
    """models:/name@alias or models:/name/version -> a pinned version, checked to exist."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.inference.variants import choose_backend

    if not model_uri.startswith("models:/") or len(model_uri.split("/")) < 2:
        raise ConfigError(f"--model {model_uri!r}: give a registered model as models:/<name>@<alias> or models:/<name>/<version>")
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    reference = model_uri.removeprefix("models:/")
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = reference.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (MlflowException, ValueError) as exc:
        raise ConfigError(f"--model {model_uri}: not found in the registry at {tracking_uri}") from exc
    chosen = choose_backend(backend, version.tags or {}, f"{name} v{version.version}")
    return ModelRef(name, str(version.version), f"models:/{name}/{version.version}", tracking_uri, chosen)


def download_model_folder(model: ModelRef, destination: str) -> Path:
    """The version's model folder (pipelines.inference.variants); older versions without one are refused."""
    import mlflow

    mlflow.set_tracking_uri(model.tracking_uri)
    mlflow.set_registry_uri(model.tracking_uri)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model.uri, dst_path=destination))
    folder = local / "artifacts" / "model"
    if not (folder / "inference.json").exists():
        raise ConfigError(f"{model.uri} has no model folder with its preprocessing (registered before the pyfunc format); train it again")
    return folder


class PredictBatch:
    """A Ray Data actor: one model in memory, a batch of texts -> predictions appended as columns."""

    def __init__(self, model: ModelRef, text_column: str, threads: int, model_batch: int | None = None):
        from pipelines.cluster.worker_env import hide_gpus_unless_assigned
        from pipelines.inference.classifier import load_classifier_from

        hide_gpus_unless_assigned()  # a CPU actor on a GPU node (a job not started by pipelines.predict): no CUDA for it

        # loaded into memory, the downloaded folder can go: an actor pool per job would
        # otherwise leave a copy of the model per actor on every node's disk
        with tempfile.TemporaryDirectory(prefix="batch-model-") as scratch:
            self.classifier = load_classifier_from(download_model_folder(model, scratch), model.backend, threads=threads)
        self.text_column = text_column
        self.model_batch = model_batch  # texts per model call (None: the whole batch in one)

    def __call__(self, batch: pa.Table) -> pa.Table:
        texts = [text if isinstance(text, str) else "" for text in batch.column(self.text_column).to_pylist()]
        step = self.model_batch or max(1, len(texts))
        probs = np.concatenate([self.classifier.probabilities(texts[start : start + step]) for start in range(0, max(1, len(texts)), step)])
        best = probs.argmax(axis=-1)
        columns = {
            "predicted_label": pa.array([self.classifier.labels[int(i)] for i in best]),
            "predicted_label_id": pa.array(best.astype("int64")),
            "score": pa.array(probs.max(axis=-1).astype("float32")),
            **{f"probability_{label}": pa.array(probs[:, j]) for j, label in enumerate(self.classifier.labels)},
        }
        for name, column in columns.items():
            batch = batch.append_column(name, column) if name not in batch.column_names else batch.set_column(batch.column_names.index(name), name, column)
        return batch


def input_files(uri: str) -> tuple[Location, list[str]]:
    """A Parquet file, a folder of them (recursively) or a URI prefix -> the files, checked to exist."""
    location = resolve(uri)
    if not location.exists():
        raise DataError("no such file or folder", uri)
    if location.is_dir() or location.is_object_store and not location.path.endswith(".parquet"):
        # a committed output (ours, or `_SUCCESS`-marked) is read by its list, never by a listing
        files = [location.child(*name.split("/")).path for name in visible_parquet_files(location)]
        if not files:
            raise DataError("no .parquet files here", uri)
        return location, files
    return location, [location.path]


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    cpus_per_actor: float
    threads: int  # intra-op threads of each actor's model

    def describe(self) -> str:
        return f"{self.actors} actor(s) x {self.threads} thread(s), {self.cpus_per_actor:g} CPU each"


def plan_actors(requested: int | None, input_files: int, total_cpus: float | None = None) -> ActorPlan:
    """How many model actors, and their share of the cluster's CPUs after the Parquet reads' reserve.

    By default one actor per CPU, one thread each: on CPUs several single-threaded models
    score more texts per second than one model with as many threads (measured in
    bench/batch_predict.py), and the CPUs rarely wait on each other. No more actors than
    input files, though: a file is one block, and an actor without a block idles.
    """
    total = float(total_cpus if total_cpus is not None else ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    usable = max(0.25, total - READ_CPUS)
    actors = requested or max(1, min(input_files, round(usable)))
    cpus = max(0.25, usable / actors)
    return ActorPlan(actors, cpus, max(1, round(cpus)))


def rows_per_call(total_rows: int, actors: int, batch_size: int) -> int:
    """Rows an actor scores per call: as many as MAX_ROWS_PER_CALL allows (Ray Data joins small
    blocks up to it), yet two calls or more per actor, so that none idles while another scores
    the last big call; a whole number of model batches."""
    rows = min(MAX_ROWS_PER_CALL, max(batch_size, total_rows // (2 * actors)))
    return -(-rows // batch_size) * batch_size


def predictions(input_uri: str, model: ModelRef, text_column: str = "text", batch_size: int = 64,
                actors: int | None = None, total_rows: int | None = None, per_call: int | None = None) -> ray.data.Dataset:
    """A lazy Dataset: the input's rows plus predicted_label, predicted_label_id, score and probability_<label>.

    `batch_size`: texts per model call. `actors`: model actors sharing the cluster's CPUs
    (default: plan_actors'). `total_rows`: the input's rows, when the caller counted them already.
    `per_call`: rows per actor call (default: rows_per_call's; bench/batch_predict.py compares).
    """
    location, files = input_files(input_uri)
    plan = plan_actors(actors, len(files))
    per_call = per_call or rows_per_call(rows_of(input_uri) if total_rows is None else total_rows, plan.actors, batch_size)
    console.say(f"[plan] {plan.describe()}")
    schema = pq.read_schema(files[0], filesystem=location.filesystem)
    if text_column not in schema.names:
        raise DataError(f"no column {text_column!r} (columns: {', '.join(schema.names)}); name it with --text-column", location.uri_of(files[0]))
    with file_list_reader():  # the V2 reader's ListFiles task wants a whole CPU the actors hold (RAY_NOTES)
        dataset = ray.data.read_parquet(files, filesystem=location.filesystem, num_cpus=READ_CPUS, override_num_blocks=len(files))
    return dataset.map_batches(
        PredictBatch,
        fn_constructor_kwargs={"model": model, "text_column": text_column, "threads": plan.threads, "model_batch": batch_size},
        batch_size=per_call,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.cpus_per_actor,
    )


def rows_of(input_uri: str) -> int:
    location, files = input_files(input_uri)
    return sum(pq.ParquetFile(location.filesystem.open_input_file(f)).metadata.num_rows for f in files)


def iter_tables(dataset: ray.data.Dataset, total_rows: int, desc: str):
    """The dataset's blocks as Arrow tables, in order, with a progress bar of rows."""
    with console.progress(total_rows, desc, unit="reviews") as progress:
        for bundle in dataset.iter_internal_ref_bundles():
            for block in bundle.blocks:
                table = ray.get(block.ref)
                table = table if isinstance(table, pa.Table) else pa.Table.from_pandas(table, preserve_index=False)
                progress.update(table.num_rows)
                yield table


def check_output(output_uri: str, overwrite: bool) -> Location:
    """Refuse, before any work, to overwrite a result unless asked to."""
    output = resolve(output_uri)
    output.check_usable()
    if not output.is_object_store and output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output_uri}: is a file; the output is a folder of Parquet parts")
    if output.exists() and not overwrite and (not output.is_dir() or output.file_sizes()):
        raise ConfigError(f"--output {output_uri}: exists already; pass --overwrite to replace it")
    return output


def write_predictions(dataset: ray.data.Dataset, total_rows: int, output_uri: str, overwrite: bool = False) -> tuple[int, int]:
    """Stream the predictions into Parquet parts under `output_uri`, committed at the end; (rows, files)."""
    output = check_output(output_uri, overwrite)
    committed = write_committed(iter_tables(dataset, total_rows, "predict"), output)
    return committed.rows, len(committed.files)
