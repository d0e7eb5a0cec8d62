"""Which MLflow store a run logs to, when one process runs several (a notebook, a test session).

`mlflow.set_tracking_uri` exports $MLFLOW_TRACKING_URI for subprocesses; the platform must
not take its own earlier export for the user's choice.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pipelines.core import tracking_env
from pipelines.tracking import store_uri

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def fresh_process(monkeypatch):
    """No $MLFLOW_TRACKING_URI from the user, nothing exported yet; MLflow's URI restored after."""
    previous = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(tracking_env, "_exported_for_us", None)
    yield monkeypatch
    mlflow.set_tracking_uri(previous)
    mlflow.set_registry_uri(previous)


def store_of(storage: Path) -> str:
    return f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}"


def test_a_second_run_with_another_storage_logs_to_its_own_store(fresh_process, tmp_path: Path) -> None:
    first, _ = store_uri.configure(str(tmp_path / "a"))
    second, artifact_root = store_uri.configure(str(tmp_path / "b"))
    assert first == store_of(tmp_path / "a")
    assert second == store_of(tmp_path / "b")
    assert artifact_root == (tmp_path / "b" / "mlflow" / "artifacts").as_uri()
    assert mlflow.get_tracking_uri() == second


def test_the_users_tracking_uri_holds_for_every_run(fresh_process, tmp_path: Path) -> None:
    users = store_of(tmp_path / "server")
    fresh_process.setenv("MLFLOW_TRACKING_URI", users)
    assert store_uri.configure(str(tmp_path / "a"))[0] == users
    assert store_uri.configure(str(tmp_path / "b"))[0] == users
    assert tracking_env.users_tracking_uri() == users


def test_a_tracking_uri_flag_applies_to_its_own_run_only(fresh_process, tmp_path: Path) -> None:
    named = store_of(tmp_path / "named")
    assert store_uri.configure(str(tmp_path / "a"), named)[0] == named
    assert store_uri.configure(str(tmp_path / "b"))[0] == store_of(tmp_path / "b")


def test_a_uri_the_user_sets_after_a_run_is_taken(fresh_process, tmp_path: Path) -> None:
    store_uri.configure(str(tmp_path / "a"))
    users = store_of(tmp_path / "server")
    fresh_process.setenv("MLFLOW_TRACKING_URI", users)
    assert store_uri.configure(str(tmp_path / "b"))[0] == users
