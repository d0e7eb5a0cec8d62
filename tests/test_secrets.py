"""Secrets are never written: a password in the tracking URI and the Serve API key, searched for everywhere.

A real PostgreSQL that checks passwords, and `python -m pipelines.train_imdb --tracking-uri
postgresql://mlflow:<password>@...` run as a user runs it, with `SERVE_API_KEY` set. The run
must succeed (the password reached the driver's and the workers' MLflow clients, through
PGPASSWORD) and leave neither value in MLflow's database (every table), under the storage
root, in the artifacts, the log file or the console, or in the run's Ray session folder.
The run is a user's first run (tests/first_run.py), made once for this test and
tests/test_console.py's, in the lane beside the other tests (tests/lane.py).
"""

from __future__ import annotations

import os

import pytest

from pipelines.core.credentials import mask, split_credentials
from tests.first_run import API_KEY, PASSWORD, first_run
from tests.first_run import TIMEOUT_S as FIRST_RUN_TIMEOUT_S
from tests.lane import lane_result


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.lane(first_run, timeout_s=FIRST_RUN_TIMEOUT_S)
def test_a_password_in_the_tracking_uri_and_the_api_key_are_written_nowhere(request):
    result = lane_result(request, first_run)
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
