"""Sweeps for real: Ray Tune running the platform's Ray Train job per trial, on a local Ray.

The settings tests at the end need no Ray: every train_imdb flag reaches the trials, and
the search-space table is checked before anything starts.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from pipelines.core.errors import ConfigError
from pipelines.training.settings import TrainConfig
from tune.settings import NOT_FLAGS, SweepConfig
from tune.sweep import check_batch_sizes, plan_concurrency, search_space, trials_planned
from tune.tune_imdb import build_parser, parse_settings

REPO = Path(__file__).resolve().parents[1]


def tiny_sweep(manifest, storage, model) -> SweepConfig:
    return SweepConfig(
        num_samples=2,  # seed 8 below samples lr 2.0e-5, then 8.9e-3: ASHA stops the second at its rung
        max_concurrent=1,  # one trial (1 CPU worker + data) fits 2 CPUs
        scheduler="asha",
        metric="val/loss",  # continuous: a tiny model's accuracy ties at 0.5 early on
        grace_period=1,
        reduction_factor=2,
        search="random",
        lr_min=1e-6,
        lr_max=1e-2,
        batch_sizes=(8,),
        train=TrainConfig(
            data=manifest.root.uri,
            model=model,
            epochs=2,  # ASHA's one rung at epoch 1 (grace 1): a trial goes on to 2 or stops
            batch_size=8,
            max_length=64,
            max_steps_per_epoch=10,  # of 67: enough for the lrs to set the trials' val/loss apart
            group_by_length=False,  # see tests/test_training.py: tiny random BERTs learn unreliably with it
            storage=str(storage),
            experiment="sweep-tests",
            register_as="tiny-sweep",
            seed=8,  # the trials' lrs (Tune's random_state) and the model's init
            onnx_variants=False,  # registration's variants are tested in tests/test_batch_inference.py
        ),
    )


@pytest.fixture(scope="module")
def sweep_outcome(ray_session, sample_manifest, tiny_model_dir, tmp_path_factory):
    from tune.sweep import run_sweep

    config = tiny_sweep(sample_manifest, tmp_path_factory.mktemp("sweep-storage"), tiny_model_dir)
    return config, run_sweep(config)


@pytest.mark.timeout(1200)
def test_every_trial_is_an_mlflow_child_run(sweep_outcome):
    config, outcome = sweep_outcome
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'"
    )
    assert len(children) == config.num_samples == len(outcome.trials)
    for child in children:
        assert float(child.data.params["lr"]) > 0
        assert child.data.params["batch_size"] == "8"
        history = client.get_metric_history(child.info.run_id, "val/loss")
        assert 1 <= len(history) <= config.train.epochs
        assert child.data.tags["swept"] == "batch_size,lr"
        assert child.data.params["max_length"] == "64" and child.data.params["warmup_ratio"] == "0.06", "the whole TrainConfig"
        assert child.info.status in ("FINISHED", "KILLED")
    logged_epochs = sum(len(client.get_metric_history(child.info.run_id, "val/loss")) for child in children)
    assert logged_epochs == sum(row["epochs_run"] for row in outcome.trials), "one val/loss per epoch each trial ran"
    artifacts = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"trials.csv", "search_space.json", "val_accuracy_vs_lr.png"} <= artifacts
    assert parent.data.metrics["trial_epochs_used"] == sum(row["epochs_run"] for row in outcome.trials)


@pytest.mark.timeout(1200)
def test_asha_stops_poor_trials_early(sweep_outcome):
    config, outcome = sweep_outcome
    stopped = [row for row in outcome.trials if row["status"] == "stopped_early"]
    assert stopped, f"ASHA stopped no trial: {outcome.trials}"
    assert all(row["epochs_run"] < config.train.epochs for row in stopped)
    assert sum(row["epochs_run"] for row in outcome.trials) < config.num_samples * config.train.epochs


@pytest.mark.timeout(1200)
def test_best_trial_is_registered_and_gated(sweep_outcome):
    config, outcome = sweep_outcome
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    best = outcome.best
    assert best["status"] == "completed"
    finished = [row for row in outcome.trials if row["status"] == "completed"]
    assert best["score"] == min(row["score"] for row in finished), "best = lowest val/loss among finished trials"
    register_as = config.train.register_as
    version = client.get_model_version(register_as, outcome.registered_version)
    assert version.tags["gate.decision"] == "promoted"  # the first version: no champion yet
    assert str(client.get_model_version_by_alias(register_as, "champion").version) == outcome.registered_version
    run = client.get_run(version.run_id)
    assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id, "registered from the best trial's child run"
    # ranked by the figure of the epoch whose model is registered, not the last epoch's
    val_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val/loss")}
    assert best["score"] == pytest.approx(val_loss[best["score_epoch"]])
    assert version.tags["best_epoch"] == str(best["score_epoch"])


def test_trials_are_ranked_by_the_epoch_they_register():
    """A trial whose last epoch got worse is ranked by its best epoch: the one whose model it registers."""
    from tune.sweep import summarize

    def result(trial_id, last_loss, best_loss, best_epoch):
        metrics = {"trial_id": trial_id, "training_iteration": 3, "val/loss": last_loss, "val/accuracy": 0.6,
                   "best/val_loss": best_loss, "best_epoch": best_epoch, "test/accuracy": 0.7}
        return SimpleNamespace(metrics=metrics, error=None, config={"lr": 1e-4, "batch_size": 8}, path=f"/x/{trial_id}")

    config = SweepConfig(metric="val/loss", train=TrainConfig(epochs=3))
    rows = summarize([result("a", last_loss=0.50, best_loss=0.45, best_epoch=3), result("b", last_loss=0.60, best_loss=0.30, best_epoch=1)], config)
    assert [row["trial_id"] for row in rows] == ["b", "a"], "b's registered epoch (0.30) beats a's (0.45), whatever the last epochs say"
    assert (rows[0]["score"], rows[0]["score_epoch"]) == (0.30, 1)


@pytest.mark.timeout(1200)
def test_parent_run_reads_like_a_training_run(sweep_outcome):
    """The sweep's run shows the best trial's data, pictures and scores; its version has a model card."""
    config, outcome = sweep_outcome
    client = MlflowClient(outcome.tracking_uri, registry_uri=outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    description = parent.data.tags["mlflow.note.content"]
    assert description.startswith("**Sweep**") and outcome.sweep_name in description
    assert outcome.best["trial_id"] in description and "`lr` (loguniform" in description and "test accuracy" in description
    assert {d.dataset.name.rsplit(":", 1)[1] for d in parent.inputs.dataset_inputs} == {"train", "val", "test"}
    pictures = {Path(a.path).name for a in client.list_artifacts(outcome.parent_run_id, "pictures")}
    assert {"confusion_matrix.png", "training_curves.png", "roc_pr_curves.png"} <= pictures
    assert {"test/accuracy", "test/roc_auc"} <= set(parent.data.metrics)
    version = client.get_model_version(config.train.register_as, outcome.registered_version)
    assert f"v{outcome.registered_version}" in version.description and "## Evaluation" in version.description
    assert version.tags["sweep"] == outcome.sweep_name


@pytest.mark.timeout(60)
def test_trial_events_are_one_console_line_each(capsys):
    import numpy as np

    from tune.sweep import TrialEvents

    config = SweepConfig(num_samples=3, lr_min=1e-5, lr_max=1e-3, batch_sizes=(16, 32), train=TrainConfig(epochs=2))
    events = TrialEvents(config)

    def trial(trial_id, last=None, error=None):
        sampled = {"lr": np.float64(1.234e-4), "batch_size": np.int64(16)}  # Tune hands back numpy numbers
        return SimpleNamespace(trial_id=trial_id, config=sampled, last_result=last or {}, get_error=lambda: error)

    epoch_1 = {"epoch": 1, "training_iteration": 1, "val/accuracy": 0.5, "val/loss": 0.69, "done": False}
    events.on_trial_start(iteration=1, trials=[], trial=trial("a_00000"))
    events.on_trial_result(iteration=2, trials=[], trial=trial("a_00000"), result=epoch_1)
    last = {**epoch_1, "epoch": 2, "val/accuracy": 0.75, "test/accuracy": 0.8125, "stopped_early": False}
    events.on_trial_complete(iteration=3, trials=[], trial=trial("a_00000", last))
    events.on_trial_result(iteration=4, trials=[], trial=trial("b_00001"), result={**epoch_1, "done": True})  # ASHA: STOP
    events.on_trial_complete(iteration=5, trials=[], trial=trial("b_00001", epoch_1))
    traceback = "Failure # 1 (occurred at 2025)\nTraceback (most recent call last):\n  File \"x.py\", line 1\n    boom()\nValueError: boom\n"
    events.on_trial_error(iteration=6, trials=[], trial=trial("c_00002", error=traceback))
    assert capsys.readouterr().out.splitlines() == [
        "[trial a_00000] started: lr=0.000123 batch_size=16",
        "[trial a_00000] epoch 1/2: val acc 0.5000, val loss 0.6900",
        "[trial a_00000] finished after 2 epochs: val acc 0.7500, val loss 0.6900, test acc 0.8125",
        "[trial b_00001] epoch 1/2: val acc 0.5000, val loss 0.6900",
        "[trial b_00001] stopped early by ASHA after epoch 1: val acc 0.5000, val loss 0.6900",
        "[trial c_00002] failed: ValueError: boom",
    ]
    many = TrialEvents(SweepConfig(num_samples=40, train=TrainConfig(epochs=2)))
    many.on_trial_result(iteration=1, trials=[], trial=trial("d_00003"), result=epoch_1)
    assert capsys.readouterr().out == "", "a long sweep gets no per-epoch lines"


def test_search_space_errors_are_clear():
    with pytest.raises(ConfigError, match="inverted"):
        SweepConfig(lr_min=1e-3, lr_max=1e-5)
    with pytest.raises(ConfigError, match="empty"):
        SweepConfig(lr_min=1e-4, lr_max=1e-4)
    with pytest.raises(ConfigError, match="--batch-sizes"):
        SweepConfig(batch_sizes=())
    with pytest.raises(ConfigError, match="--lr-min"):
        SweepConfig(lr_min=0.0)
    with pytest.raises(ConfigError, match="grace"):
        SweepConfig(grace_period=1, train=TrainConfig(epochs=1))
    with pytest.raises(ConfigError, match="exceed"):
        check_batch_sizes(SweepConfig(batch_sizes=(16, 4096)), train_rows=1000)


def test_grid_covers_every_combination():
    config = SweepConfig(search="grid", lr_min=1e-5, lr_max=1e-3, grid_points=3, batch_sizes=(16, 32), num_samples=1)
    lr, batch_size = config.dimensions()
    assert lr.grid(config.grid_points) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert batch_size.grid(config.grid_points) == [16, 32]
    assert trials_planned(config) == 6
    wider = SweepConfig(search="grid", grid_points=3, num_samples=1, space=("warmup_ratio=uniform:0:0.2", "grad_accum=randint:1:2", "truncation=choice:head,head_tail"))
    assert [row.grid(3) for row in wider.dimensions()] == [pytest.approx([0, 0.1, 0.2]), [1, 2], ["head", "head_tail"]]
    assert trials_planned(wider) == 3 * 2 * 2


@pytest.mark.timeout(120)
def test_more_concurrency_than_resources(ray_session):
    with pytest.raises(ConfigError, match="--max-concurrent 3"):
        plan_concurrency(SweepConfig(max_concurrent=3), use_gpu=False)
    assert plan_concurrency(SweepConfig(), use_gpu=False) == 1  # 2 CPUs hold one 1.65-CPU trial


@pytest.mark.timeout(60)
def test_cli_rejects_bad_space_before_ray():
    result = subprocess.run(
        [sys.executable, "-m", "tune.tune_imdb", "--lr-min", "1e-2", "--lr-max", "1e-4"],
        capture_output=True, text=True, cwd=REPO, timeout=60, env={**os.environ},
    )
    assert result.returncode == 2
    assert "inverted" in result.stderr and "Traceback" not in result.stderr


# --- tune_imdb takes every train_imdb flag (no Ray) --------------------------------------

def _other_value(field: dataclasses.Field):
    """A valid value of a TrainConfig field that differs from its default, and its argv."""
    default, choices = field.default, field.metadata.get("choices")
    if choices:
        value = next(choice for choice in choices if choice != default)
    elif isinstance(default, bool):
        return (not default), [f"--{'' if default is False else 'no-'}{field.name.replace('_', '-')}"]
    elif isinstance(default, int):
        value = default * 2  # even: a batch size stays a multiple of 2 workers or 2 micro-batches
    elif isinstance(default, float):
        value = default / 2
    elif field.name in ("max_steps_per_epoch", "early_stopping_patience", "threads_per_worker"):
        value = 2
    else:
        value = f"/tmp/{field.name}-value" if field.name in ("data", "storage") else f"{field.name}-value"
    return value, [f"--{field.name.replace('_', '-')}", str(value)]


TRAIN_FLAGS = [f for f in dataclasses.fields(TrainConfig) if f.name not in NOT_FLAGS]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("field", TRAIN_FLAGS, ids=[f.name for f in TRAIN_FLAGS])
def test_every_train_flag_sets_the_trials_base(field):
    # the default space sweeps lr and batch_size: their own flags need a space without them
    space = ["--space", "seed=choice:1,2" if field.name != "seed" else "shuffle_window=choice:64,128"]
    value, argv = _other_value(field)
    config = parse_settings(argv + space)
    assert getattr(config.train, field.name) == value
    trial = config.trial_config({"seed": 1} if field.name != "seed" else {"shuffle_window": 64}, "train-t1")
    assert getattr(trial, field.name) == value


@pytest.mark.timeout(60)
def test_help_lists_train_flags_but_not_per_run_ones(capsys):
    help_text = build_parser().format_help()
    for flag in ("--truncation", "--warmup-ratio", "--grad-accum", "--weight-decay", "--cache-tokenized",
                 "--eval-batch-size", "--early-stopping-patience", "--shuffle-window", "--space", "--promote"):
        assert flag in help_text
    assert "--run-name" not in help_text and "--max-failures" not in help_text
    assert parse_settings([]).train.experiment == "imdb-sentiment-sweeps"
    for argv in (["--run-name", "x"], ["--max-failures", "1"]):
        with pytest.raises(SystemExit):
            parse_settings(argv)
        assert "unrecognized arguments" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_a_swept_warmup_ratio_reaches_the_trials_train_config():
    config = parse_settings(["--space", "warmup_ratio=uniform:0:0.1", "truncation=choice:head,head_tail",
                             "--batch-size", "16", "--grad-accum", "2", "--data", "sample"])
    assert config.swept() == ("warmup_ratio", "truncation")
    sampled = {name: domain.sample() for name, domain in search_space(config).items()}
    assert 0 <= sampled["warmup_ratio"] <= 0.1
    trial = config.trial_config(sampled, "train-t1", data="/datasets/sample/v1")
    assert isinstance(trial, TrainConfig) and isinstance(trial.warmup_ratio, float)
    assert (trial.warmup_ratio, trial.truncation) == (pytest.approx(sampled["warmup_ratio"]), sampled["truncation"])
    assert (trial.batch_size, trial.grad_accum, trial.lr, trial.data) == (16, 2, TrainConfig.lr, "/datasets/sample/v1")
    assert (trial.run_name, trial.max_failures, trial.promote, trial.resume) == ("train-t1", 0, "never", False)
    assert config.train.promote == "auto", "--promote is the sweep's, for the best trial"
    assert config.as_dict()["train"]["warmup_ratio"] == "swept: --space warmup_ratio=uniform:0:0.1"


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--space", "warmup=uniform:0:0.1"], "'warmup' is not a train_imdb flag (did you mean warmup_ratio?)"),
        (["--space", "truncation=uniform:0:1"], "uniform needs a numeric field, and truncation is a str: use choice:head,head_tail"),
        (["--space", "batch_size=loguniform:8:64"], "batch_size is an integer: use randint"),
        (["--space", "num_workers=choice:1,2"], "num_workers cannot be swept"),
        (["--space", "lr=loguniform:1e-3:1e-5"], "inverted"),
        (["--space", "warmup_ratio=uniform:0.1:0.1"], "empty"),
        (["--space", "warmup_ratio=uniform:0:1"], "warmup_ratio=1.0 would be refused: --warmup-ratio must be in [0, 1)"),
        (["--num-workers", "2", "--batch-sizes", "16", "25"], "batch_size=25 would be refused: --batch-size 25 must be a multiple"),
        (["--space", "batch_size=choice:16,32", "grad_accum=randint:1:3"], "batch_size=16, grad_accum=3 would be refused"),
        (["--space", "lr=log:1e-5:1e-3"], "unknown distribution 'log'"),
        (["--space", "lr:1e-5"], "write FIELD=DISTRIBUTION:ARGS"),
        (["--space", "lr=choice:1e-5,1e-5"], "listed twice"),
        (["--space", "truncation=choice:tail"], "'tail' is not one of head, head_tail"),
        (["--lr", "3e-5"], "--lr is given, but lr is swept (--space lr=loguniform:1e-5:1e-3)"),
    ],
)
def test_bad_search_space_is_one_clear_line(argv, message):
    with pytest.raises(ConfigError) as error:
        parse_settings(argv)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.timeout(60)
def test_shorthands_fill_the_table():
    config = parse_settings(["--lr-min", "2e-5", "--batch-sizes", "16", "64", "--num-workers", "4"])
    lr, batch_size = config.dimensions()
    assert (lr.distribution, lr.values, batch_size.values) == ("loguniform", (2e-5, 1e-3), (16, 64))
    assert config.train.batch_size == 16, "a swept field's base holds a value the trials may get"
    fixed_lr = parse_settings(["--space", "warmup_ratio=uniform:0:0.1", "--lr", "3e-5"])
    assert fixed_lr.swept() == ("warmup_ratio",) and fixed_lr.train.lr == 3e-5
    # the default --batch-size 32 is no multiple of 3 workers, but it is swept: no trial gets it
    assert parse_settings(["--num-workers", "3", "--batch-sizes", "18", "36"]).train.batch_size == 18


@pytest.mark.timeout(300)
def test_a_trial_stopped_by_ctrl_c_before_its_first_report_is_not_counted_as_ended(ray_session, tmp_path):
    """The sweep decides between 'interrupted, --resume continues it' and 'finished, register
    the best' from the trials it counts as ended: those must be the saved state's, which a
    resume runs from, whatever Tune's returned trial objects say after it stopped them."""
    from ray import tune

    from tune.sweep import saved_ended_trials

    def second_trial_interrupts_the_driver(config: dict) -> None:
        """The first trial reports and ends; the second sends the driver Ctrl+C before its first
        report and waits to be stopped: the moment a user's Ctrl+C can fall in. (Defined here:
        Ray pickles it by value; the workers cannot import this test module.)"""
        if config["index"] == 0:
            tune.report({"score": 1.0})
            return
        os.kill(config["driver_pid"], signal.SIGINT)
        time.sleep(120)

    tuner = tune.Tuner(
        second_trial_interrupts_the_driver,
        param_space={"index": tune.grid_search([0, 1]), "driver_pid": os.getpid()},
        tune_config=tune.TuneConfig(max_concurrent_trials=1),
        run_config=tune.RunConfig(name="ctrl-c", storage_path=str(tmp_path), verbose=0),
    )
    grid = tuner.fit()
    # (Ray 2.60's own grid counts 2 here: num_terminated includes the stopped second trial)
    assert saved_ended_trials(grid) == 1, "the interrupted trial is one a --resume must run again"
