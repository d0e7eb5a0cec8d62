"""Shared fixtures: one local Ray for the whole session, a prepared sample dataset,
and a tiny random BERT built from a config (fast enough for 2 CPUs)."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads OpenMP (read once, at load): this process, its subprocesses and the Ray
# workers it starts all inherit it. The suite runs two lanes on 2 cores (tests/lane.py), so a
# torch process's second thread often finds its core taken; OpenMP's default spin-wait then
# burns the time slice the other process needed. Measured on this machine beside other work:
# a tiny-BERT training step 120-310 ms with 2 spinning threads, 20-40 ms passive, 12-16 ms on
# one thread (bench/omp_wait_policy.py, docs/benchmarks.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest

from tests import lane

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no MLflow telemetry file in HOME, no calls out
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The sample corpus is small, but tests use an even smaller one to stay quick.
TEST_TRAIN_PER_LABEL = 300
TEST_TEST_PER_LABEL = 100


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray sized like the CI machine (2 CPUs), shared by every test that needs it."""
    from pipelines.cluster.runtime import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def sample_manifest(storage_root):
    """A small sample corpus prepared through the real prepare path."""
    from pipelines.data.prepare import prepare_dataset
    from pipelines.data.sample_corpus import write_sample_corpus
    from pipelines.data.settings import PrepareConfig

    raw = write_sample_corpus(
        storage_root / "raw", train_per_label=TEST_TRAIN_PER_LABEL, test_per_label=TEST_TEST_PER_LABEL, seed=1
    )
    config = PrepareConfig(source=str(raw), storage=str(storage_root), rows_per_shard=128, progress=False)
    return prepare_dataset(config).manifest


@pytest.fixture(scope="session")
def bundled_model_path() -> str:
    from pipelines.text.tokenization import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A 2-layer, 64-wide random BERT with the bundled tokenizer (tests/tiny_model.py)."""
    from tests.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


# `make test-fast` (-m "not slow") is the edit loop: it leaves out every test that starts Ray,
# a server (S3, PostgreSQL, MLflow, Serve) or a training run, found from the fixtures it uses.
HEAVY_FIXTURES = frozenset({
    "ray_session",  # everything on Ray: training, sweeps, Serve, batch prediction
    "s3",  # tests/test_object_storage.py: moto's S3 server
    "store", "cluster_tracking",  # tests/test_mlflow_server.py: PostgreSQL and the MLflow server
    "registry", "registered",  # a model logged to MLflow (tests/test_serve.py, tests/test_batch_inference.py)
    "gate_server",  # tests/test_gate_faults.py: an MLflow server behind the fault proxy
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        # and the lane's tests: each runs whole commands (tests/lane.py)
        if HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("lane"):
            item.add_marker(pytest.mark.slow)


# Tests of whole commands in processes of their own run in a second lane, beside the others (tests/lane.py).
def pytest_addoption(parser):
    lane.add_option(parser)


def pytest_configure(config):
    config.pluginmanager.register(lane.LanePlugin(), "lane")
