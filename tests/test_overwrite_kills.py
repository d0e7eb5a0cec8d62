"""`prepare --force` and `predict --overwrite`, killed (`kill -9`) at each of their steps, on local disk and S3.

Each run replaces what the last one committed with other content (tests/scenarios/overwrite_steps.py):
a dataset version rebuilt with another validation fraction, or a prediction output with another
`generation`. After a kill at any step, what readers find must be whole: the previous content
or the new one, never a mix, never a manifest or `_SUCCESS` naming a missing file, and `LATEST`
on a readable version. A run to the end afterwards leaves nothing but what it commits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.core.committed_parts import SUCCESS_MARKER, committed_files
from pipelines.core.storage import resolve
from pipelines.data.datasets import LATEST_NAME, load_manifest, read_split_table
from pipelines.data.sample_corpus import write_sample_corpus
from tests.services import S3Server

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[1]
SCENARIO = REPO / "tests" / "scenarios" / "overwrite_steps.py"
PREPARE_PERIOD = 20  # the scenario's validation fraction: 0.05 + 0.01 * (generation % 20)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with S3Server(tmp_path_factory.mktemp("s3")) as server:
        server.create_bucket("kills")
        yield server


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_sample_corpus(tmp_path_factory.mktemp("raw") / "aclImdb", train_per_label=40, test_per_label=20, seed=5)


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path, s3, monkeypatch):
    """(a folder URI to write under, the environment the commands get); this process reads it with the same"""
    if request.param == "local":
        return str(tmp_path), {**os.environ}
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)  # the checks here read the store as the commands do
    return f"s3://kills/{request.node.originalname}", {**os.environ}


def scenario(args: list[str], env: dict, kill_at: int | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCENARIO), *args, *([str(kill_at)] if kill_at else [])]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False)


def steps_of(result: subprocess.CompletedProcess) -> int:
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split("STEPS")[1])


def kill_at_every_step(args_for, check, env, period: int = 10**6) -> list[str]:
    """For every step: one generation written whole, the next one killed at that step; what was found after each kill.

    `check` tells the generation found, modulo `period`. Each killed run starts from a whole result without leftovers, so that step N is the same
    step every time (a killed run's leftovers add steps to the next run's clean-up).
    """
    found, generation = [], 0
    steps = None
    step = 1
    while steps is None or step <= steps:
        generation += 1
        whole = steps_of(scenario(args_for(generation), env))
        steps = whole if steps is None else steps
        assert check() == generation % period
        killed = scenario(args_for(generation + 1), env, kill_at=step)
        assert killed.returncode == -9, f"step {step}: not killed there ({killed.returncode}): {killed.stderr[-2000:]}"
        now = check()
        assert now in (generation % period, (generation + 1) % period), f"killed at step {step} of {steps}: found generation {now}"
        found.append("previous" if now == generation % period else "new")
        generation += 1
        step += 1
    generation += 1
    steps_of(scenario(args_for(generation), env))
    assert check() == generation % period
    return found


def test_prepare_force_killed_at_every_step_leaves_a_whole_version_behind_latest(where, corpus):
    storage, env = where

    def generation_of_version() -> int:
        manifest = load_manifest("imdb", storage=storage)  # LATEST -> manifest -> every shard's size
        assert resolve(storage).child("datasets", "imdb", LATEST_NAME).read_text().strip() == "v1"
        for split, info in manifest.splits.items():
            assert read_split_table(manifest, split).num_rows == info.rows, split
        return round((manifest.settings["val_fraction"] - 0.05) / 0.01)

    found = kill_at_every_step(lambda g: ["prepare", storage, str(corpus), str(g)], generation_of_version, env, period=PREPARE_PERIOD)
    assert "previous" in found and "new" in found, found  # killed before and after the manifest moved
    version = resolve(storage).child("datasets", "imdb", "v1")
    manifest = load_manifest("imdb", storage=storage)
    listed = {s.path for info in manifest.splits.values() for s in info.files} | {"manifest.json"}
    assert set(version.file_sizes()) == listed, "shards of earlier generations or killed runs were left"


def test_predict_overwrite_killed_at_every_step_leaves_a_whole_output(where):
    storage, env = where
    output = resolve(storage).child("scored")

    def generation_of_output() -> int:
        parts = committed_files(output)
        assert parts, f"no committed output in {output.uri}"
        table = pa.concat_tables([pq.read_table(output.child(p).path, filesystem=output.filesystem) for p in parts])
        assert sorted(table["row"].to_pylist()) == list(range(90)), "rows lost or doubled"
        generations = set(table["generation"].to_pylist())
        assert len(generations) == 1, f"a mix of results: {generations}"
        return generations.pop()

    found = kill_at_every_step(lambda g: ["predict", output.uri, str(g)], generation_of_output, env)
    assert "previous" in found and "new" in found, found
    assert set(output.file_sizes()) == {SUCCESS_MARKER, *committed_files(output)}, "a killed run's parts were left"
