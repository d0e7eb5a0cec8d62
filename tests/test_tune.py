"""Sweeps for real: Ray Tune running the platform's Ray Train job per trial, on a local Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.errors import ConfigError
from tune.settings import SweepConfig
from tune.sweep import check_batch_sizes, lr_grid, plan_concurrency, trials_planned

REPO = Path(__file__).resolve().parents[1]


def tiny_sweep(manifest, storage, model, **overrides) -> SweepConfig:
    settings = dict(
        data=manifest.root.uri,
        model=model,
        num_samples=4,
        max_concurrent=1,  # one trial (1 CPU worker + data) fits 2 CPUs
        epochs=3,
        scheduler="asha",
        metric="val/loss",  # continuous: a tiny model's accuracy ties at 0.5 early on
        grace_period=1,
        reduction_factor=2,
        search="random",
        lr_min=1e-6,
        lr_max=1e-2,
        batch_sizes=(8,),
        max_length=64,
        group_by_length=False,  # see tests/test_training.py: tiny random BERTs learn unreliably with it
        storage=str(storage),
        experiment="sweep-tests",
        register_as="tiny-sweep",
        seed=3,
    )
    settings.update(overrides)
    return SweepConfig(**settings)


@pytest.fixture(scope="module")
def sweep_outcome(ray_session, sample_manifest, tiny_model_dir, tmp_path_factory):
    from tune.sweep import run_sweep

    config = tiny_sweep(sample_manifest, tmp_path_factory.mktemp("sweep-storage"), tiny_model_dir)
    return config, run_sweep(config)


@pytest.mark.timeout(1200)
def test_every_trial_is_an_mlflow_child_run(sweep_outcome):
    config, outcome = sweep_outcome
    client = MlflowClient(outcome.tracking_uri)
    parent = client.get_run(outcome.parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{outcome.parent_run_id}'"
    )
    assert len(children) == config.num_samples == len(outcome.trials)
    for child in children:
        assert float(child.data.params["lr"]) > 0
        assert child.data.params["batch_size"] == "8"
        history = client.get_metric_history(child.info.run_id, "val/loss")
        assert 1 <= len(history) <= config.epochs
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
    assert all(row["epochs_run"] < config.epochs for row in stopped)
    assert sum(row["epochs_run"] for row in outcome.trials) < config.num_samples * config.epochs


@pytest.mark.timeout(1200)
def test_best_trial_is_registered_and_gated(sweep_outcome):
    config, outcome = sweep_outcome
    client = MlflowClient(outcome.tracking_uri)
    best = outcome.best
    assert best["status"] == "completed"
    finished = [row for row in outcome.trials if row["status"] == "completed"]
    assert best["score"] == min(row["score"] for row in finished), "best = lowest val/loss among finished trials"
    version = client.get_model_version(config.register_as, outcome.registered_version)
    assert version.tags["gate.decision"] == "promoted"  # the first version: no champion yet
    assert str(client.get_model_version_by_alias(config.register_as, "champion").version) == outcome.registered_version
    run = client.get_run(version.run_id)
    assert run.data.tags["mlflow.parentRunId"] == outcome.parent_run_id, "registered from the best trial's child run"


@pytest.mark.timeout(1500)
def test_interrupted_sweep_resumes(ray_session, sample_manifest, tiny_model_dir, tmp_path):
    """SIGINT the sweep's driver after its first trial, then --resume runs the second in the same MLflow run."""
    import ray

    from tune.sweep import run_sweep

    storage = tmp_path / "storage"
    args = [
        sys.executable, "-m", "tune.tune_imdb", "--data", sample_manifest.root.uri, "--model", tiny_model_dir,
        "--num-samples", "2", "--max-concurrent", "1", "--epochs", "2", "--scheduler", "fifo", "--metric", "val/loss",
        "--lr-min", "1e-4", "--lr-max", "1e-2", "--batch-sizes", "8", "--max-length", "64", "--no-group-by-length", "--storage", str(storage),
        "--sweep-name", "resume-me", "--register-as", "resume-sweep", "--experiment", "sweep-tests",
        "--ray-address", ray.get_runtime_context().gcs_address,
    ]
    driver = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trial_results = storage / "tune_results" / "resume-me"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and driver.poll() is None:
        finished = [p for p in trial_results.glob("*/result.json") if p.read_text().count("\n") >= 2]
        if finished:
            break
        time.sleep(2)
    assert driver.poll() is None, "the sweep ended before it could be interrupted"
    driver.send_signal(signal.SIGINT)
    driver.wait(timeout=180)

    marker = trial_results / "mlflow_parent_run_id"
    parent_before = marker.read_text().strip()
    config = SweepConfig(
        data=sample_manifest.root.uri, model=tiny_model_dir, num_samples=2, max_concurrent=1, epochs=2, scheduler="fifo",
        metric="val/loss", lr_min=1e-4, lr_max=1e-2, batch_sizes=(8,), max_length=64, group_by_length=False, storage=str(storage),
        sweep_name="resume-me", resume=True, register_as="resume-sweep", experiment="sweep-tests",
    )
    outcome = run_sweep(config)
    assert outcome.parent_run_id == parent_before
    assert len(outcome.trials) == 2
    assert all(row["status"] == "completed" for row in outcome.trials), outcome.trials
    assert outcome.registered_version is not None


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
        SweepConfig(epochs=1, grace_period=1)
    with pytest.raises(ConfigError, match="exceed"):
        check_batch_sizes(SweepConfig(batch_sizes=(16, 4096)), train_rows=1000)


def test_grid_covers_every_combination():
    config = SweepConfig(search="grid", lr_min=1e-5, lr_max=1e-3, lr_grid_points=3, batch_sizes=(16, 32), num_samples=1)
    assert lr_grid(config) == pytest.approx([1e-5, 1e-4, 1e-3])
    assert trials_planned(config) == 6


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
