"""A user's first training run, made once for two tests: what it printed (tests/test_console.py)
and that its secrets were written nowhere (tests/test_secrets.py).

`python -m pipelines.train_imdb --data sample` on the tiny BERT, as a user types it, with its
own local Ray, against a real PostgreSQL that checks passwords (`--tracking-uri
postgresql://<user>:<password>@...`) and with `SERVE_API_KEY` set. One run serves both: a
training run with its registration is the slow part, and each test reads what it needs.
What they assert on is read here, while the database is up: the console, the MLflow run
(through MLflow's client), every table, and every file the run wrote (the storage root, the
working folder, its Ray session folder).

A job of the lane beside the other tests (tests/lane.py).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from tests.services import PostgresServer
from tests.tiny_model import build_in_subprocess

PASSWORD = f"pw-{uuid.uuid4().hex}"
API_KEY = f"key-{uuid.uuid4().hex}"
MODEL_NAME = "console-test"
TIMEOUT_S = 480


def train_args(model_dir: str) -> list[str]:
    return ["--data", "sample", "--model", model_dir, "--epochs", "2", "--max-steps-per-epoch", "3",
            "--max-length", "32", "--batch-size", "8", "--eval-batch-size", "128", "--register-as", MODEL_NAME]


def files_holding(roots: list[Path], secrets: list[str]) -> list[str]:
    found = []
    for root in roots:
        for path in root.rglob("*"):
            try:
                if path.is_file() and any(s.encode() in path.read_bytes() for s in secrets):
                    found.append(str(path))
            except OSError:
                continue
    return found


def mlflow_view(uri: str) -> dict:
    """What the run's MLflow page shows: the run, its artifacts, inputs and metrics, the version's card."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("imdb-sentiment")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    if not runs:
        return {}
    run = runs[0]
    run_id = run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "pictures")}
    inputs = {(d.dataset.name.rsplit(":", 1)[1], {t.key: t.value for t in d.tags}["mlflow.data.context"]) for d in run.inputs.dataset_inputs}
    return {
        "run_id": run_id, "status": run.info.status, "artifacts": artifacts, "note": run.data.tags.get("mlflow.note.content", ""),
        "inputs": inputs, "metrics": dict(run.data.metrics), "step_losses": len(client.get_metric_history(run_id, "train/step_loss")),
        "card": client.get_model_version(MODEL_NAME, "1").description,
    }


def first_run(workdir: Path, env: dict) -> dict:
    """Run it; everything both tests assert on."""
    # Ray's session folder under a TMPDIR of this run (short: Ray's socket paths are limited)
    tmp = Path(tempfile.mkdtemp(prefix="run-", dir="/tmp" if Path("/tmp").is_dir() else None))
    postgres = PostgresServer(workdir / "db", password=PASSWORD).start()
    try:
        model = build_in_subprocess(workdir, env)[0]
        work = workdir / "cwd"  # MLflow's default artifact root for a database store is ./mlruns
        storage = work / "storage"
        storage.mkdir(parents=True)
        run_env = {k: v for k, v in env.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PGPASSWORD")}
        run_env.update(SERVE_API_KEY=API_KEY, TMPDIR=str(tmp), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        uri = f"postgresql://{postgres.user}:{PASSWORD}@127.0.0.1:{postgres.port}/{postgres.database}"
        run = subprocess.run([sys.executable, "-m", "pipelines.train_imdb", *train_args(model), "--tracking-uri", uri, "--storage", str(storage)],
                             cwd=work, env=run_env, capture_output=True, text=True, timeout=TIMEOUT_S - 60)
        tables = [row[0] for row in postgres.query("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")]
        searched = [work, tmp]
        return {
            "returncode": run.returncode, "output": run.stdout + run.stderr,
            "mlflow": mlflow_view(uri) if run.returncode == 0 else {},
            "tables": tables,
            "in_database": [table for table in tables if any(s in str(postgres.query(f'SELECT * FROM "{table}"')) for s in (PASSWORD, API_KEY))],
            "params": dict(postgres.query("SELECT key, value FROM params")),
            "uri_without_password": f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/{postgres.database}",
            "files_searched": sum(1 for root in searched for path in root.rglob("*") if path.is_file()),
            "in_files": files_holding(searched, [PASSWORD, API_KEY]),
            "ray_sessions": [str(p) for p in (tmp / "ray").glob("session_*")] if (tmp / "ray").exists() else [],
        }
    finally:
        postgres.stop()
        shutil.rmtree(tmp, ignore_errors=True)
