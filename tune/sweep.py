"""A sweep over training settings: Ray Tune runs the platform's Ray Train job as each trial.

The pattern ray 2.60 recommends for Train V2: the Tune trial is a small driver
function that builds the same TorchTrainer as `pipelines.train_imdb` (same worker
loop, same data pipeline) with a `TuneReportCallback`, so ASHA sees each epoch's
validation accuracy and stops trailing trials. Each trial trains with the sweep's
base TrainConfig and its sampled values (tune.settings). MLflow gets a parent run
for the sweep and a child run per trial; the best finished trial is registered and
passes the same champion gate as a training run.

The console gets stage lines and one line per trial event (`TrialEvents`); Tune's
status tables are off and everything Ray prints goes to the log file (pipelines.core.console).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient
from ray import tune
from ray.data import DataContext
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from pipelines.cluster import runtime
from pipelines.core import console, stopping
from pipelines.core.errors import ConfigError, PlatformError
from pipelines.core.storage import resolve
from pipelines.data.datasets import Manifest, load_manifest
from pipelines.data.reading import DataResources
from pipelines.text.model import resolve_model_path
from pipelines.text.tokenization import load_tokenizer, rust_tokenizer_agrees
from pipelines.tracking import callbacks, registration, registry, reports, run_log, runs, store_uri
from pipelines.training import feed, job, resources
from pipelines.training.checkpoints import best_model_folder
from tune.settings import Dimension, SweepConfig, coerce

log = logging.getLogger(__name__)
PARENT_RUN_FILE = "mlflow_parent_run_id"
TRIAL_TAG = "tune_trial_id"
# Tune needs a non-empty resource request; the trial itself only waits on its trainer.
TRIAL_DRIVER_CPUS = 0.05
# Past this many (trials x epochs) the console gets no per-epoch lines, only starts and ends.
MAX_EPOCH_LINES = 60


class SweepFailed(PlatformError):
    """The sweep ended without a trial that can be registered."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl+C: Tune saved the sweep's state and stopped; --resume continues it."""


@dataclass(frozen=True)
class SweepContext:
    """What every trial needs besides its sampled values (shipped once via with_parameters)."""

    sweep: SweepConfig
    dataset_uri: str
    model_path: str
    pad_token_id: int
    train_rows: int
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    use_gpu: bool
    data_resources: dict
    alive_nodes: int
    object_store_bytes: float  # this trial's share
    threads_per_worker: int
    rust_tokenizer: bool  # the data tasks load tokenizer.json alone (checked once, in the driver)


@dataclass(frozen=True)
class SweepOutcome:
    parent_run_id: str
    sweep_name: str
    trials: list[dict]
    best: dict | None
    registered_version: str | None
    gate: registry.GateDecision | None
    tracking_uri: str


# --- the search -----------------------------------------------------------------------

def domain(row: Dimension, config: SweepConfig):
    """One row of the table as Tune's search space."""
    if config.search == "grid":
        return tune.grid_search(row.grid(config.grid_points))
    if row.distribution == "loguniform":
        return tune.loguniform(row.low, row.high)
    if row.distribution == "uniform":
        return tune.uniform(row.low, row.high)
    if row.distribution == "randint":
        return tune.randint(row.low, row.high + 1)  # Tune's upper end is excluded; ours is included
    return tune.choice(list(row.values))


def search_space(config: SweepConfig) -> dict:
    """{TrainConfig field: Tune domain}: what each trial's `sampled` dict holds."""
    return {row.name: domain(row, config) for row in config.dimensions()}


def search_algorithm(config: SweepConfig, concurrency: int):
    if config.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        # metric/mode come from TuneConfig (not both); Tune wraps it in a ConcurrencyLimiter
        return OptunaSearch(seed=config.train.seed)
    # A generator passed in ignores TuneConfig.max_concurrent_trials (ray 2.60): the limit
    # must be its own, or every trial starts at once and they starve each other of CPUs.
    # Its random_state fixes the sequence of sampled trials: two sweeps with the same seed
    # and space try the same trials, whatever the scheduler stops.
    return BasicVariantGenerator(random_state=config.train.seed, max_concurrent=concurrency)


def trial_scheduler(config: SweepConfig):
    if config.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",  # one report per epoch
            # One past the last epoch: at max_t ASHA *stops* the trial, killing it before its
            # Train run shuts down, and that run's placement group can leak (RAY_NOTES). A
            # trial that reaches its last epoch should end on its own instead.
            max_t=config.train.epochs + 1,
            grace_period=config.grace_period,
            reduction_factor=config.reduction_factor,
        )
    return FIFOScheduler()


def trials_planned(config: SweepConfig) -> int:
    if config.search == "grid":
        return math.prod(len(row.grid(config.grid_points)) for row in config.dimensions()) * config.num_samples
    return config.num_samples


def plan_concurrency(config: SweepConfig, use_gpu: bool) -> int:
    """Trials at once that fit the cluster; an explicit --max-concurrent beyond that is an error."""
    cpus, gpus = runtime.cluster_cpus(), runtime.cluster_gpus()
    train = config.train
    per_trial_cpus = train.num_workers * train.cpus_per_worker + resources.DATA_CPU_RESERVE + TRIAL_DRIVER_CPUS
    fits = int(cpus // per_trial_cpus)
    if use_gpu:
        fits = min(fits, int(gpus // train.num_workers))
    if fits < 1:
        raise ConfigError(
            f"one trial needs {per_trial_cpus:g} CPUs ({train.num_workers} worker(s) x {train.cpus_per_worker:g} "
            f"+ {resources.DATA_CPU_RESERVE} for data) but the cluster has {cpus:g}"
        )
    if config.max_concurrent is not None and config.max_concurrent > fits:
        raise ConfigError(
            f"--max-concurrent {config.max_concurrent} trials need {config.max_concurrent * per_trial_cpus:g} CPUs"
            f"{f' and {config.max_concurrent * train.num_workers} GPUs' if use_gpu else ''}; "
            f"the cluster holds {fits} at once ({cpus:g} CPUs, {gpus:g} GPUs)"
        )
    return config.max_concurrent or fits


def trial_threads(config: SweepConfig, plan: resources.ResourcePlan, concurrency: int) -> int:
    """Torch threads per trial worker: the CPUs left by data, shared by the trials that run at once."""
    if plan.use_gpu:
        return plan.threads_per_worker
    free = plan.cluster_cpus - concurrency * resources.DATA_CPU_RESERVE
    return max(1, int(free // (concurrency * config.train.num_workers)))


def check_batch_sizes(config: SweepConfig, train_rows: int) -> None:
    """Every batch size a trial may get fills at least one optimizer step per epoch."""
    num_workers = config.train.num_workers
    per_worker_rows = train_rows // num_workers
    too_big = [b for b in config.possible_values("batch_size") if b // num_workers > per_worker_rows]
    if too_big:
        where = next((row.where for row in config.dimensions() if row.name == "batch_size"), "--batch-size")
        raise ConfigError(
            f"{where}: batch sizes {too_big} exceed the {train_rows} training rows "
            f"({per_worker_rows} per worker): not one full batch per epoch"
        )


# --- the console: one line per trial event ---------------------------------------------

class TrialEvents(tune.Callback):
    """Tune callback (runs in the sweep's driver): a console line per trial start, epoch and end.

    Stands in for Tune's status tables (RunConfig(verbose=0)), which redraw every few
    seconds. Holds only plain values: Tune pickles it with the sweep for --resume.
    """

    def __init__(self, config: SweepConfig):
        self.swept = config.swept()
        self.epochs = config.train.epochs
        self.stopper = "ASHA" if config.scheduler == "asha" else "the scheduler"
        self.epoch_lines = trials_planned(config) * config.train.epochs <= MAX_EPOCH_LINES
        self.stopped: set[str] = set()  # trials the scheduler told to stop

    def on_trial_start(self, iteration, trials, trial, **info):
        values = " ".join(f"{name}={_shown(coerce(name, trial.config.get(name)))}" for name in self.swept)
        console.say(f"[trial {trial.trial_id}] started: {values}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done"):  # set before callbacks run when the scheduler decided STOP
            self.stopped.add(trial.trial_id)
        if self.epoch_lines:
            console.say(f"[trial {trial.trial_id}] epoch {_epoch(result)}/{self.epochs}: {_val_scores(result)}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        if "test/accuracy" in last:
            early = f", stopped early (best epoch {last.get('best_epoch')})" if last.get("stopped_early") else ""
            console.say(f"[trial {trial.trial_id}] finished after {_epoch(last)} epochs{early}: "
                        f"{_val_scores(last)}, test acc {last['test/accuracy']:.4f}")
        elif trial.trial_id in self.stopped:
            console.say(f"[trial {trial.trial_id}] stopped early by {self.stopper} after epoch {_epoch(last)}: {_val_scores(last)}")
        else:
            console.say(f"[trial {trial.trial_id}] ended after epoch {_epoch(last) or 0} without a test pass")

    def on_trial_error(self, iteration, trials, trial, **info):
        try:
            text = trial.get_error() or ""
        except Exception:  # noqa: BLE001 - the error file is the trial's; the reason is a convenience
            text = ""
        console.say(f"[trial {trial.trial_id}] failed: {error_reason(str(text))}")


def _epoch(result: dict):
    return result.get("epoch", result.get("training_iteration"))


def _val_scores(result: dict) -> str:
    shown = [f"{label} {result[key]:.4f}" for key, label in (("val/accuracy", "val acc"), ("val/loss", "val loss")) if result.get(key) is not None]
    return ", ".join(shown) or "no validation metrics"


def error_reason(text: str) -> str:
    """A trial's error file -> its one line: the last exception line of the (worker's) traceback."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = next((line for line in reversed(lines) if not line.startswith(("File ", "^", "~", "Failure # "))), "")
    return reason[:300] or "no error text (see the log file)"


# --- one trial (runs inside Tune) -----------------------------------------------------

def _child_run(client: MlflowClient, context: SweepContext, trial_id: str) -> str:
    """This trial's MLflow run, nested under the sweep's (found again after a resume)."""
    existing = client.search_runs(
        [context.experiment_id],
        filter_string=f"tags.{TRIAL_TAG} = '{trial_id}' and tags.`mlflow.parentRunId` = '{context.parent_run_id}'",
    )
    if existing:
        return existing[0].info.run_id
    run = client.create_run(
        context.experiment_id,
        run_name=f"{context.sweep_name}-{trial_id}",
        tags={"mlflow.parentRunId": context.parent_run_id, TRIAL_TAG: trial_id, "sweep": context.sweep_name},
    )
    return run.info.run_id


def run_trial(sampled: dict, context: SweepContext) -> None:
    """Tune trainable: one fine-tuning run with the sweep's base settings and the sampled values."""
    sweep = context.sweep
    trial_id = tune.get_context().get_trial_id()
    # TrainConfig's checks run here on the sampled combination
    config = sweep.trial_config(sampled, f"train-{trial_id}", context.dataset_uri)
    client = MlflowClient(context.tracking_uri)
    run_id = _child_run(client, context, trial_id)
    # the whole TrainConfig, as a train_imdb run logs it: trials and runs compare key by key
    params = runs.flat_params({**asdict(config), "model_path": context.model_path})
    try:
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                         tags=[RunTag("swept", ",".join(sorted(sampled)))])
    except Exception:  # noqa: BLE001 - logged before a resume (params are write-once)
        pass
    manifest = load_manifest(context.dataset_uri)
    # this trial actor's own DataContext (each dataset copies it): Ray Data's per-operator
    # bars would redraw into the sweep's log file, thousands of lines per trial
    DataContext.get_current().enable_progress_bars = False
    cache = feed.should_cache_tokenized(config, manifest, context.alive_nodes, context.object_store_bytes)
    datasets = feed.training_datasets(manifest, context.model_path, config, DataResources(**context.data_resources), cache, context.rust_tokenizer)
    loop_config = job.build_loop_config(config, manifest, context.model_path, context.pad_token_id, context.threads_per_worker)
    run_config = RunConfig(
        name=config.run_name,
        storage_path=resolve(config.storage).child("tune_results", context.sweep_name, "train").uri,
        failure_config=FailureConfig(max_failures=0),
        # as for a training run: the latest resumes a sweep's unfinished trial, one more
        # survives a bad write; without a limit every epoch of every trial stays on disk
        checkpoint_config=CheckpointConfig(num_to_keep=2),
        # MLflow first: once Tune has the result it may stop (kill) this trial at once
        callbacks=[callbacks.MlflowEpochLogger(context.tracking_uri, run_id), TuneReportCallback()],
    )
    job.build_trainer(loop_config, datasets, config, context.use_gpu, run_config).fit()
    client.set_terminated(run_id, "FINISHED")


# --- the sweep (driver) ---------------------------------------------------------------

def _parent_marker(config: SweepConfig, sweep_name: str):
    return resolve(config.train.storage).child("tune_results", sweep_name, PARENT_RUN_FILE)


def _start_parent_run(config: SweepConfig, sweep_name: str, experiment_id: str) -> str:
    if not config.resume:
        resolve(config.train.storage).child("tune_results", sweep_name).makedirs()
    return runs.start_or_resume_run(
        _parent_marker(config, sweep_name), resume=config.resume, experiment_id=experiment_id,
        run_name=sweep_name, kind="sweep", name_flag="--sweep-name",
    )


def _tuner(config: SweepConfig, context: SweepContext, concurrency: int, sweep_name: str) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context),
        # the trial function only drives: its Train workers hold the CPUs/GPUs
        {"cpu": TRIAL_DRIVER_CPUS},
    )
    sweep_path = resolve(config.train.storage).child("tune_results", sweep_name)
    searcher = search_algorithm(config, concurrency)
    if config.resume and tune.Tuner.can_restore(sweep_path.uri):
        return tune.Tuner.restore(sweep_path.uri, trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=search_space(config),
        tune_config=tune.TuneConfig(
            metric=config.metric,
            mode=config.mode,
            scheduler=trial_scheduler(config),
            search_alg=searcher,
            num_samples=config.num_samples,
            # a generator carries its own limit; a Searcher (optuna) gets Tune's ConcurrencyLimiter
            max_concurrent_trials=None if isinstance(searcher, BasicVariantGenerator) else concurrency,
        ),
        run_config=tune.RunConfig(
            name=sweep_name,
            storage_path=resolve(config.train.storage).child("tune_results").uri,
            verbose=0,  # no status tables: TrialEvents prints a line per event instead
            callbacks=[TrialEvents(config)],
        ),
    )


def summarize(result_grid, config: SweepConfig) -> list[dict]:
    """One row per trial: its sampled values, how far it got, its metrics, and why it ended."""
    swept = config.swept()
    rows = []
    for result in result_grid:
        metrics = result.metrics or {}
        epochs_run = int(metrics.get("training_iteration", 0))
        if result.error:
            status = "error"
        elif "test/accuracy" in metrics:
            status = "completed"
        else:
            status = "stopped_early"
        rows.append(
            {
                "trial_id": _trial_id(result),
                **{name: coerce(name, result.config.get(name)) for name in swept},
                "epochs_run": epochs_run,
                "val_accuracy": metrics.get("val/accuracy"),
                "val_loss": metrics.get("val/loss"),
                "test_accuracy": metrics.get("test/accuracy"),
                # a finished trial registers its best epoch's model: it is ranked by that epoch's figure
                "score": metrics.get(registered_epoch_key(config.metric), metrics.get(config.metric)),
                "score_epoch": metrics.get("best_epoch", epochs_run),
                "status": status,
                # a URI: on an object store Ray gives the path without its scheme
                "checkpoint_path": resolve(config.train.storage).uri_of(metrics[CHECKPOINT_PATH_KEY]) if metrics.get(CHECKPOINT_PATH_KEY) else None,
            }
        )
    sign = -1 if config.mode == "max" else 1
    return sorted(rows, key=lambda row: (row["score"] is None, sign * (row["score"] or 0)))


def registered_epoch_key(metric: str) -> str:
    """The final report's key for `metric` at the epoch whose model is registered (val/loss -> best/val_loss)."""
    return "best/" + metric.replace("/", "_")


def _trial_id(result) -> str:
    return (result.metrics or {}).get("trial_id") or Path(result.path).name


def last_reports(result_grid) -> dict[str, dict]:
    """{trial id: its last report}: a finished trial's holds its test pass (test/*, score histograms)."""
    return {_trial_id(result): dict(result.metrics or {}) for result in result_grid}


def results_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["trial_id"])
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def plot_axis(config: SweepConfig) -> str:
    """The swept field on the plot's x axis: lr when swept, else the first row."""
    swept = config.swept()
    return "lr" if "lr" in swept else swept[0]


def plot_accuracy(rows: list[dict], config: SweepConfig, path: Path) -> None:
    """Validation accuracy against one swept field, a line per batch size when that is swept too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = plot_axis(config)
    by = "batch_size" if "batch_size" in config.swept() and x != "batch_size" else None
    # text, flags and 'none' go on a categorical axis, as strings
    categorical = any(isinstance(row[x], (str, bool)) or row[x] is None for row in rows)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    for group in sorted({row[by] for row in rows} if by else {None}):
        points = sorted(
            (str(row[x]) if categorical else row[x], row["val_accuracy"], row["status"]) for row in rows
            if (by is None or row[by] == group) and row["val_accuracy"] is not None
        )
        if not points:
            continue
        line = axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"batch {group}" if by else None)[0]
        stopped = [p for p in points if p[2] != "completed"]
        axes.scatter([p[0] for p in stopped], [p[1] for p in stopped], marker="x", s=80, color=line.get_color())
    if not categorical and next(row for row in config.dimensions() if row.name == x).distribution == "loguniform":
        axes.set_xscale("log")
    axes.set_xlabel(x)
    axes.set_ylabel("validation accuracy (last epoch run)")
    axes.set_title(f"sweep: validation accuracy vs {x} (x = stopped early)")
    if by:
        axes.legend()
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _close_child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str, rows: list[dict]) -> None:
    """Stopped trials were killed mid-run: close their MLflow runs with the reason."""
    status_of = {row["trial_id"]: row["status"] for row in rows}
    for run in client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"):
        status = status_of.get(run.data.tags.get(TRIAL_TAG))
        if status is None:
            continue
        client.set_tag(run.info.run_id, "tune.status", status)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED" if status == "stopped_early" else "FAILED")


def _kill_open_child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> None:
    """Ctrl-C or SIGTERM: the trials that were running stopped with the sweep (a --resume logs into their runs again)."""
    try:
        for run in client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and attributes.status = 'RUNNING'"):
            client.set_terminated(run.info.run_id, "KILLED")
    except Exception as exc:  # noqa: BLE001 - the store may be what failed: the interruption is what to report
        log.warning("could not mark the sweep's running trials KILLED: %s", exc)


def _child_run_of(client: MlflowClient, context: SweepContext, trial_id: str) -> str:
    child_runs = client.search_runs(
        [context.experiment_id],
        filter_string=f"tags.{TRIAL_TAG} = '{trial_id}' and tags.`mlflow.parentRunId` = '{context.parent_run_id}'",
    )
    return child_runs[0].info.run_id


def _register_best(config: SweepConfig, context: SweepContext, manifest: Manifest, best: dict, child_run_id: str, client: MlflowClient):
    register_as = config.train.register_as
    trained = config.trial_config({name: best[name] for name in config.swept()}, f"train-{best['trial_id']}", manifest.root.uri)
    with mlflow.start_run(run_id=child_run_id, nested=True):
        mlflow.log_metric("test/accuracy", best["test_accuracy"], step=best["epochs_run"])
        mlflow.set_tag("best_trial_of_sweep", context.sweep_name)
        with Checkpoint(best["checkpoint_path"]).as_directory() as folder:
            model_info = registration.register_model(str(best_model_folder(folder)), context.model_path, register_as, manifest, trained.max_length,
                                                    trained.truncation, trained.onnx_variants, source=best["checkpoint_path"])
    return model_info.registered_model_version


def _best_values(best: dict, config: SweepConfig) -> tuple[dict, dict]:
    """The best trial's sampled values: numbers as metrics best/<field>, the rest as tags."""
    metrics, tags = {}, {}
    for name in config.swept():
        value = best[name]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[f"best/{name}"] = value
        else:
            tags[f"best/{name}"] = str(value)
    return metrics, tags


def _row_text(row: Dimension) -> str:
    if row.distribution == "choice":
        return "one of " + ", ".join(_shown(value) for value in row.values)
    return f"{row.distribution} {row.low:g} to {row.high:g}"


def sweep_description(config: SweepConfig, sweep_name: str, rows: list[dict], best: dict, best_run_id: str) -> str:
    """The sweep's paragraph of the parent run's description: what was swept, what won, how."""
    swept = ", ".join(f"`{row.name}` ({_row_text(row)})" for row in config.dimensions())
    chosen = ", ".join(f"{name}={_shown(best[name])}" for name in config.swept())
    stopped = sum(row["status"] == "stopped_early" for row in rows)
    failed = sum(row["status"] == "error" for row in rows)
    return (
        f"Sweep `{sweep_name}` swept {swept} over {len(rows)} trials ({config.search} search, {config.scheduler.upper()} scheduler; "
        f"{stopped} stopped early, {failed} failed), ranked by {config.metric} of the epoch each trial registers "
        f"(its best by validation accuracy). "
        f"Best trial `{best['trial_id']}`: {chosen} ({config.metric} {_shown(best['score'])} at epoch {best['score_epoch']} "
        f"of {best['epochs_run']}). "
        f"The pictures and test scores are the best trial's (child run `{best_run_id}`); every trial is in trials.csv."
    )


def _record_best(config: SweepConfig, context: SweepContext, manifest: Manifest, rows: list[dict], best: dict, final: dict, client: MlflowClient):
    """The best trial's test pass in the parent run (pictures, description), then its model registered with a card."""
    train = config.train
    model = job.model_name(train.model, context.model_path).split(" (")[0]
    child_run_id = _child_run_of(client, context, best["trial_id"])
    runs.log_test_results(final, manifest.to_json(), step=int(final.get("epoch", best["epochs_run"])))
    final = {**final, **reports.log_run_report(context.parent_run_id, final, manifest, model, kind="sweep", history_run_id=child_run_id)}
    description = client.get_run(context.parent_run_id).data.tags.get("mlflow.note.content", "")
    client.set_tag(context.parent_run_id, "mlflow.note.content",
                   f"{description}\n\n{sweep_description(config, context.sweep_name, rows, best, child_run_id)}".strip())
    # the model version links to the child run: it shows the same pictures
    reports.log_run_report(child_run_id, final, manifest, model, kind="sweep trial")
    console.enter("registration")
    version = _register_best(config, context, manifest, best, child_run_id, client)
    best_config = config.trial_config({name: best[name] for name in config.swept()}, f"train-{best['trial_id']}", manifest.root.uri)

    def record(decision: registry.GateDecision) -> None:
        """The version's record, complete before the alias may move to it."""
        client.set_model_version_tag(train.register_as, version, "sweep", context.sweep_name)
        client.set_model_version_tag(train.register_as, version, "best_epoch", str(final.get("best_epoch", best["epochs_run"])))
        reports.write_model_card(train.register_as, version, child_run_id, final, manifest, model, decision, asdict(best_config))

    mlflow.set_tags({"registered_model": train.register_as, "registered_version": version})
    decision = registry.apply_gate(client, train.register_as, version, train.promote, float(best["test_accuracy"]), manifest.content_hash,
                                   before_promotion=record)
    return version, decision


def saved_ended_trials(result_grid) -> int:
    """How many trials the sweep's saved state holds as ended (TERMINATED or ERROR): the ones a
    --resume will not run again.

    Not the ResultGrid's own counts: on Ctrl+C Tune saves the state first and stops the running
    trials after, and a trial stopped before its first report can then read TERMINATED in the
    grid while the saved state says PENDING (seen in CI: the interrupted sweep went on to
    register as if it had finished, with a trial of 0 epochs "stopped early").
    """
    from ray.tune import ExperimentAnalysis

    saved = ExperimentAnalysis(result_grid.experiment_path, storage_filesystem=result_grid.filesystem)
    return sum(trial.status in ("TERMINATED", "ERROR") for trial in saved.trials)


def run_sweep(config: SweepConfig) -> SweepOutcome:
    # before the settings go anywhere (MLflow params of the sweep and its trials, Ray's trial configs)
    config = replace(config, train=replace(config.train, tracking_uri=store_uri.take_credentials(config.train.tracking_uri)))
    train = config.train
    console.enter("data")
    resolve(train.storage).check_usable()  # a wrong endpoint, key or bucket: one line, before any work
    manifest = job.resolve_dataset(train)
    check_batch_sizes(config, manifest.splits["train"].rows)
    console.stage("data", job.describe_splits(manifest))
    console.enter("model")
    model_path = resolve_model_path(train.model)
    tokenizer = load_tokenizer(model_path)
    swept = config.swept()
    max_length = "swept" if "max_length" in swept else f"{train.max_length} tokens"
    truncation = "swept" if "truncation" in swept else train.truncation.replace("_", "+")
    console.stage("model", f"{job.model_name(train.model, model_path)}: max length {max_length}, truncation {truncation}")
    tracking_uri, artifact_root = store_uri.configure(train.storage, train.tracking_uri)
    experiment_id = runs.ensure_experiment(train.experiment, artifact_root)

    console.enter("resources")
    runtime.init_ray(train.ray_address)
    # the settings that size a trial (workers, CPUs, GPUs) are the same in every trial
    probe = config.trial_config({}, "probe", manifest.root.uri)
    # the autoscaler request covers the whole sweep and is withdrawn when it ends
    with resources.requested_resources(probe):
        # trials tokenize in their own Ray Data pipelines, concurrently: plan as streaming
        plan = resources.plan_resources(probe, tokenized_up_front=False)
        use_gpu, data_resources = plan.use_gpu, plan.data
        concurrency = plan_concurrency(config, use_gpu)
        threads = trial_threads(config, plan, concurrency)
        # each trial decides this itself (run_trial); the probe's answer is the usual one
        cached = feed.should_cache_tokenized(probe, manifest, runtime.alive_node_count(), runtime.object_store_bytes() / concurrency)
        per_trial = replace(plan, threads_per_worker=threads, tokenized_up_front=cached).describe(train.num_workers)
        console.stage("resources", f"{per_trial}; {concurrency} trial{'s' if concurrency > 1 else ''} at once")
        DataContext.get_current().enable_progress_bars = False
        sweep_name = config.sweep_name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        parent_run_id = _start_parent_run(config, sweep_name, experiment_id)
        try:
            if not config.resume:
                mlflow.log_params(runs.flat_params({**config.as_dict(), "max_concurrent_resolved": concurrency, "trials_planned": trials_planned(config)}))
                grid_points = config.grid_points if config.search == "grid" else None
                mlflow.log_dict(
                    {"space": {row.name: row.as_dict(grid_points) for row in config.dimensions()},
                     "search": config.search, "scheduler": config.scheduler, "seed": train.seed},
                    "search_space.json",
                )
                runs.log_dataset_inputs(manifest)
            mlflow.set_tags({**runs.environment_tags(), "dataset_content_hash": manifest.content_hash, "sweep": sweep_name})
            context = SweepContext(
                sweep=config, dataset_uri=manifest.root.uri, model_path=model_path,
                pad_token_id=tokenizer.pad_token_id, train_rows=manifest.splits["train"].rows, tracking_uri=tracking_uri,
                experiment_id=experiment_id, parent_run_id=parent_run_id, sweep_name=sweep_name, use_gpu=use_gpu,
                data_resources=data_resources.as_dict(), alive_nodes=runtime.alive_node_count(),
                object_store_bytes=runtime.object_store_bytes() / concurrency,
                threads_per_worker=threads, rust_tokenizer=rust_tokenizer_agrees(model_path),
            )
            console.stage("sweep", f"{sweep_name}: {trials_planned(config)} trials of up to {train.epochs} epochs, {concurrency} at once, "
                                   f"{config.search} search over {', '.join(swept)}, {config.scheduler.upper()} scheduler by {config.metric}; "
                                   f"MLflow parent run {parent_run_id}{' (resumed)' if config.resume else ''}")
            # Tune takes Ctrl-C (and so SIGTERM: pipelines.core.stopping) while it runs, and keeps it after
            with stopping.kept_handlers():
                result_grid = _tuner(config, context, concurrency, sweep_name).fit()
            # Tune answers Ctrl+C by saving its state and returning: no best of a partial sweep
            ended = saved_ended_trials(result_grid)
            if ended < trials_planned(config):
                resume_hint = f"interrupted with {ended} of {trials_planned(config)} trials ended; continue it with --sweep-name {sweep_name} --resume"
                console.stage("sweep", resume_hint)
                raise SweepInterrupted(resume_hint)
            console.enter("results")
            rows = summarize(result_grid, config)
            client = MlflowClient(tracking_uri)
            _close_child_runs(client, experiment_id, parent_run_id, rows)
            _log_sweep_artifacts(rows, config)
            finished = [row for row in rows if row["status"] == "completed" and row["test_accuracy"] is not None]
            if not finished:
                raise SweepFailed(f"no trial of sweep {sweep_name} finished; see the trials table in MLflow run {parent_run_id}")
            best = finished[0]  # rows are sorted best first by --metric
            best_metrics, best_tags = _best_values(best, config)
            mlflow.log_metrics({"best/val_accuracy": best["val_accuracy"], "best/test_accuracy": best["test_accuracy"], **best_metrics,
                                "trial_epochs_used": sum(r["epochs_run"] for r in rows),
                                "trials_stopped_early": sum(r["status"] == "stopped_early" for r in rows)})
            mlflow.set_tags({"best_trial": best["trial_id"], **best_tags})
            version, decision = _record_best(config, context, manifest, rows, best, last_reports(result_grid)[best["trial_id"]], client)
        except BaseException as exc:
            _upload_log(parent_run_id)  # a failed sweep keeps its log too
            if isinstance(exc, KeyboardInterrupt):
                _kill_open_child_runs(MlflowClient(tracking_uri), experiment_id, parent_run_id)
            mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        _upload_log(parent_run_id)
        mlflow.end_run()
        outcome = SweepOutcome(parent_run_id, sweep_name, rows, best, version, decision, tracking_uri)
        print_summary(outcome, config)
        return outcome


def _upload_log(run_id: str) -> None:
    """The console session's log file as the run's console.log (none outside a session)."""
    if console.active() and console.log_path() is not None:
        run_log.upload_console_log(run_id, console.log_path())


def _log_sweep_artifacts(rows: list[dict], config: SweepConfig) -> None:
    mlflow.log_text(results_csv(rows), "trials.csv")
    with tempfile.TemporaryDirectory() as tmp:
        plot = Path(tmp) / f"val_accuracy_vs_{plot_axis(config)}.png"
        plot_accuracy(rows, config, plot)
        mlflow.log_artifact(str(plot))


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def print_summary(outcome: SweepOutcome, config: SweepConfig) -> None:
    swept = config.swept()
    widths = {name: max([len(name), *(len(_shown(row[name])) for row in outcome.trials)]) + 2 for name in swept}
    lines = ["", f"=== sweep {outcome.sweep_name} finished: {len(outcome.trials)} trials ==="]
    lines.append(f"{'trial':<18}" + "".join(f"{name:>{widths[name]}}" for name in swept) + f"{'epochs':>8}{'val acc':>9}  status")
    for row in outcome.trials:
        acc = f"{row['val_accuracy']:.4f}" if row["val_accuracy"] is not None else "-"
        values = "".join(f"{_shown(row[name]):>{widths[name]}}" for name in swept)
        lines.append(f"{row['trial_id']:<18}{values}{row['epochs_run']:>8}{acc:>9}  {row['status']}")
    best = outcome.best
    chosen = " ".join(f"{name}={_shown(best[name])}" for name in swept)
    lines.append(f"best: {best['trial_id']} {chosen} val acc {best['val_accuracy']:.4f} test acc {best['test_accuracy']:.4f}")
    if outcome.registered_version:
        verdict = "promoted to @champion" if outcome.gate and outcome.gate.promote else "not promoted; @champion unchanged"
        lines.append(f"registered: models:/{config.train.register_as}/{outcome.registered_version} ({verdict}: {outcome.gate.reason if outcome.gate else ''})")
    lines.append(f"MLflow parent run: {outcome.parent_run_id} (experiment {config.train.experiment!r}); UI: {store_uri.ui_command(outcome.tracking_uri)}")
    for line in lines:
        console.say(line)
    log.debug("trials: %s", json.dumps(outcome.trials, default=str))
