"""Secrets are never written: a password in the tracking URI and the Serve API key, searched for everywhere.

A real PostgreSQL that checks passwords, and `python -m pipelines.train_imdb --tracking-uri
postgresql://mlflow:<password>@...` run as a user runs it, with `SERVE_API_KEY` set. The run
must succeed (the password reached the driver's and the workers' MLflow clients, through
PGPASSWORD) and leave neither value in MLflow's database (every table), under the storage
root, in the artifacts, the log file or the console, or in the run's Ray session folder.
The run is a job of the lane beside the other tests (tests/lane.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from pipelines.core.credentials import mask, split_credentials
from tests.lane import lane_result
from tests.services import PostgresServer
from tests.tiny_model import build_in_subprocess

REPO = Path(__file__).resolve().parents[1]
PASSWORD = f"pw-{uuid.uuid4().hex}"
API_KEY = f"key-{uuid.uuid4().hex}"


def files_holding(roots: list[Path], secrets: list[str]) -> list[str]:
    found = []
    needles = [secret.encode() for secret in secrets]
    for root in roots:
        for path in root.rglob("*"):
            try:
                if path.is_file() and not path.is_symlink() and any(needle in path.read_bytes() for needle in needles):
                    found.append(str(path))
            except OSError:
                continue
    return found


def run_with_a_password(workdir: Path, env: dict) -> dict:
    """A real training run against a password-checking PostgreSQL; what it left, searched."""
    # Ray's session folder under a TMPDIR of this run (short: Ray's socket paths are limited)
    tmp = Path(tempfile.mkdtemp(prefix="sec-", dir="/tmp" if Path("/tmp").is_dir() else None))
    postgres = PostgresServer(workdir / "db", password=PASSWORD).start()
    try:
        # the tiny BERT and a small corpus prepared under the storage root (the full sample corpus would only cost time)
        model, dataset, _ = build_in_subprocess(workdir, env, corpus_per_label=60, seed=7)
        storage = workdir / "storage"
        run_env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PGPASSWORD")}
        run_env.update(SERVE_API_KEY=API_KEY, TMPDIR=str(tmp), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        uri = f"postgresql://{postgres.user}:{PASSWORD}@127.0.0.1:{postgres.port}/{postgres.database}"
        work = workdir / "cwd"  # MLflow's default artifact root for a database store is ./mlruns
        work.mkdir()
        run = subprocess.run(
            [sys.executable, "-m", "pipelines.train_imdb", "--data", dataset, "--model", model, "--tracking-uri", uri,
             "--storage", str(storage), "--epochs", "1", "--max-steps-per-epoch", "2", "--max-length", "32",
             "--batch-size", "8", "--eval-batch-size", "128", "--no-onnx-variants", "--register-as", "secret-test"],
            cwd=work, env=run_env, capture_output=True, text=True, timeout=420,
        )
        tables = [row[0] for row in postgres.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        in_database = [table for table in tables if any(s in str(postgres.query(f'SELECT * FROM "{table}"')) for s in (PASSWORD, API_KEY))]
        params = dict(postgres.query("SELECT key, value FROM params"))
        searched = [storage, work, tmp]
        return {
            "returncode": run.returncode, "output": run.stdout + run.stderr, "tables": tables, "in_database": in_database, "params": params,
            "uri_without_password": f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/{postgres.database}",
            "files_searched": sum(1 for root in searched for path in root.rglob("*") if path.is_file()),
            "in_files": files_holding(searched, [PASSWORD, API_KEY]),
            "ray_sessions": [str(p) for p in (tmp / "ray").glob("session_*")] if (tmp / "ray").exists() else [],
        }
    finally:
        postgres.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.lane(run_with_a_password, timeout_s=480)
def test_a_password_in_the_tracking_uri_and_the_api_key_are_written_nowhere(request):
    result = lane_result(request, run_with_a_password)
    assert result["returncode"] == 0, result["output"][-4000:]
    assert PASSWORD not in result["output"] and API_KEY not in result["output"], "on the console"
    assert {"runs", "params", "model_versions"} <= set(result["tables"]), "the run did not reach the database"
    assert result["params"]["tracking_uri"] == result["uri_without_password"], "the run records where its store is, without the password"
    assert result["in_database"] == [], f"the secrets are in MLflow's tables {result['in_database']}"
    assert result["ray_sessions"], "no Ray session folder was searched"
    assert result["in_files"] == [], f"the secrets are in {result['in_files'][:10]}"
    print(f"searched {len(result['tables'])} tables and {result['files_searched']} files")


def test_masking_and_splitting_credentials():
    assert mask("postgresql://mlflow:s3cret@db:5432/mlflow") == "postgresql://mlflow:***@db:5432/mlflow"
    assert mask("error at https://u:tok@h/x?token=abc&page=2&api_key=zz") == "error at https://u:***@h/x?token=***&page=2&api_key=***"
    assert mask("no secrets in http://127.0.0.1:5000/health") == "no secrets in http://127.0.0.1:5000/health"
    assert split_credentials("postgresql://mlflow:s3cr%40t@db:5432/mlflow") == ("postgresql://mlflow@db:5432/mlflow", {"PGPASSWORD": "s3cr@t"})
    assert split_credentials("https://user:tok@mlflow.example.com/") == (
        "https://mlflow.example.com/", {"MLFLOW_TRACKING_USERNAME": "user", "MLFLOW_TRACKING_PASSWORD": "tok"})
    assert split_credentials("sqlite:////tmp/mlflow.db") == ("sqlite:////tmp/mlflow.db", {})


@pytest.mark.timeout(120)
def test_a_server_with_credentials_in_its_uri_is_reached_and_never_printed(monkeypatch, tmp_path):
    """http://user:password@host: the check sends them as MLflow's client does; no error line shows the password."""
    import mlflow

    from pipelines.core import tracking_env

    # configure() sets process-wide state: this test's copy of the environment, and MLflow's URIs put back after
    environ = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI")}
    monkeypatch.setattr(os, "environ", environ)
    monkeypatch.setattr(tracking_env, "_exported_for_us", tracking_env._exported_for_us)
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    try:
        _check_credentials_in_a_server_uri(tmp_path)
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def _check_credentials_in_a_server_uri(tmp_path):
    from pipelines.core.errors import ConfigError
    from pipelines.core.ports import free_port
    from pipelines.tracking import store_uri
    from tests.services import MlflowServer

    with MlflowServer(tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}", str(tmp_path / "artifacts")) as server:
        host = server.uri.removeprefix("http://")
        uri, _ = store_uri.configure(str(tmp_path / "storage"), f"http://alice:{PASSWORD}@{host}")
        assert uri == server.uri and PASSWORD not in uri
        assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == PASSWORD
    with pytest.raises(ConfigError) as unreachable:
        store_uri.configure(str(tmp_path / "storage"), f"http://alice:{PASSWORD}@127.0.0.1:{free_port()}")
    assert PASSWORD not in str(unreachable.value) and "not reachable" in str(unreachable.value)
    assert "Name or service not known" not in str(unreachable.value), "the credentials were taken for part of the host"
