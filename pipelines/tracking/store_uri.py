"""Where the MLflow store is, and whether it answers.

The embedded default is a SQLite store plus an artifact folder under the storage
root. On a cluster, workers on other nodes cannot write a SQLite file on the
head, so `MLFLOW_TRACKING_URI` (or --tracking-uri) points at the MLflow server
that cluster.yaml starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

from pipelines.core import console, credentials, tracking_env
from pipelines.core.credentials import mask
from pipelines.core.errors import ConfigError
from pipelines.core.storage import DEFAULT_STORAGE, is_remote, resolve

LOCAL_STORE_DIR = "mlflow"


def local_store(storage: str) -> tuple[str, str]:
    """(tracking URI, artifact root) of the embedded SQLite store under a local storage root."""
    root = Path(resolve(storage).path) / LOCAL_STORE_DIR
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def take_credentials(tracking_uri: str | None) -> str | None:
    """--tracking-uri and $MLFLOW_TRACKING_URI without their passwords, which go to the variables
    the clients read (pipelines.core.credentials): call it before the URI is recorded anywhere."""
    from_env = os.environ.get("MLFLOW_TRACKING_URI")
    if from_env:
        os.environ["MLFLOW_TRACKING_URI"] = credentials.take_credentials(from_env)
    return credentials.take_credentials(tracking_uri)


def configure(storage: str, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """Point MLflow at --tracking-uri, else $MLFLOW_TRACKING_URI, else the local store.

    Returns (tracking URI, artifact root for new experiments or None for the server's own);
    a password in either URI is moved to the environment first (`take_credentials`).
    """
    tracking_uri = take_credentials(tracking_uri)
    from_env = tracking_env.users_tracking_uri()
    uri = tracking_uri or from_env
    artifact_root = None
    if not uri:
        if is_remote(storage):
            # an object store cannot hold a SQLite file: the store goes to this machine's
            # cache (never the current directory), and the user is told so
            uri, artifact_root = local_store(DEFAULT_STORAGE)
            console.warn(
                f"no --tracking-uri or $MLFLOW_TRACKING_URI, so MLflow runs and models go to {uri} on this "
                "machine only; on a cluster, set MLFLOW_TRACKING_URI to the MLflow server"
            )
        else:
            uri, artifact_root = local_store(storage)
    elif uri.startswith("sqlite:///"):
        # a SQLite file named directly: its artifacts beside it, as for the embedded store
        # (MLflow's own default, ./mlruns, would land in whatever folder the user ran from)
        artifact_root = (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    tracking_env.mark_exported(None if from_env else uri)
    return uri, artifact_root


def check_reachable(uri: str, timeout_s: float = 10.0) -> None:
    """An MLflow server or database that does not answer: one line now, not minutes of client retries then a traceback."""
    if uri.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "mysql", "mssql"):
        _check_database(uri)
        return
    if not uri.startswith(("http://", "https://")):
        return
    import base64
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{uri.rstrip('/')}/health")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:  # as MLflow's client sends them
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"/health answered HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"/health answered HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise ConfigError(f"MLflow tracking server {mask(uri)}: not reachable ({mask(str(problem))}); is it up, and is MLFLOW_TRACKING_URI right?")


def _check_database(uri: str) -> None:
    """One connection attempt (MLflow's own store retries for about two minutes first)."""
    import sqlalchemy
    from sqlalchemy.exc import SQLAlchemyError

    try:
        engine = sqlalchemy.create_engine(uri, pool_pre_ping=False)
        with engine.connect():
            pass
        engine.dispose()
    except (SQLAlchemyError, ImportError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ConfigError(f"MLflow tracking store {mask(uri)}: cannot connect ({mask(reason[:300])})") from exc


def ui_command(tracking_uri: str) -> str:
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f"mlflow ui --backend-store-uri {tracking_uri} --port 5000  (then open http://127.0.0.1:5000)"
