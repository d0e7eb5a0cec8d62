"""The MLflow tracking server over the store a training run writes, through its REST API.

A run and a registered version are made with MLflow's client in the same SQLite store and
artifact folder that `pipelines.tracking.store_uri` gives a local training run (training itself
is tested elsewhere; here it would only cost minutes). Then:
- `mlflow server` as docs/commands.md shows it for a local run ("The MLflow UI of a local
  run") finds the run, its metric history, the registered model and the `champion` alias
  over HTTP, and serves the UI;
- `platform/mlflow/start_mlflow_server.sh --daemon`, the way cluster.yaml starts it on the
  head, takes its settings from the environment, proxies artifacts from a client that has
  no access to the artifact folder, and `--stop` stops it;
- the cluster's set-up with real servers on 127.0.0.1 (tests/services.py): the start script
  over PostgreSQL with artifacts proxied to S3 (moto); a client that knows only the tracking
  URI logs, registers and sets `champion`, and the rows land in PostgreSQL, the files in the
  bucket. An unreachable database or a missing bucket stops the script with one line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from pipelines.core.ports import free_port

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
START_SCRIPT = REPO / "platform" / "mlflow" / "start_mlflow_server.sh"
BIN = Path(sys.executable).parent  # the venv's bin: mlflow, python
EXPERIMENT = "imdb-sentiment"
MODEL = "imdb-sentiment"
RUN_NAME = "imdb-20260101-000000-abc123"


def server_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def wait_healthy(base_url: str, process: subprocess.Popen | None, log_path: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    log = log_path.read_text(errors="replace")[-3000:] if log_path.exists() else "(no log)"
    pytest.fail(f"the MLflow server at {base_url} did not answer /health:\n{log}")


def stop_group(process: subprocess.Popen) -> None:
    """mlflow runs its web server as child processes: stop the whole process group."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A finished training-like run, a registered version 1 and @champion -> 1."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.store_uri import local_store

    storage = tmp_path_factory.mktemp("mlflow-server-storage")
    tracking_uri, artifact_root = local_store(str(storage))
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiment_id = client.create_experiment(EXPERIMENT, artifact_location=f"{artifact_root}/{EXPERIMENT}")
    run = client.create_run(experiment_id, run_name=RUN_NAME, tags={"ray_run_name": RUN_NAME, "dataset": "sample/v1"})
    run_id = run.info.run_id
    client.log_param(run_id, "lr", "5e-05")
    for epoch, loss in ((1, 0.69), (2, 0.41)):
        client.log_metric(run_id, "train/loss", loss, step=epoch)
        client.log_metric(run_id, "train/data_wait_fraction", 0.05, step=epoch)
    client.log_metric(run_id, "test/accuracy", 0.83, step=2)
    client.log_dict(run_id, {"matrix": [[40, 10], [7, 43]]}, "confusion_matrix.json")
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, source=f"runs:/{run_id}/model", run_id=run_id, tags={"test_accuracy": "0.83"})
    client.set_registered_model_alias(MODEL, "champion", version.version)
    client.set_tag(run_id, "registered_version", version.version)
    client.set_terminated(run_id)
    return {"storage": storage, "tracking_uri": tracking_uri, "artifact_root": artifact_root, "run_id": run_id, "version": str(version.version)}


def test_mlflow_server_shows_the_training_run_and_the_registered_version(store, tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    # docs/commands.md's command for a local run, plus the artifact root training uses
    command = [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", store["tracking_uri"],
        "--default-artifact-root", store["artifact_root"],
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True)
    try:
        wait_healthy(base, process, log_path)
        with httpx.Client(base_url=base, timeout=30) as http:
            experiment = http.get("/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": EXPERIMENT}).json()["experiment"]
            found = http.post(
                "/api/2.0/mlflow/runs/search",
                json={"experiment_ids": [experiment["experiment_id"]], "filter": f"tags.ray_run_name = '{RUN_NAME}'"},
            ).json()["runs"]
            assert [run["info"]["run_id"] for run in found] == [store["run_id"]]
            run = found[0]
            assert run["info"]["status"] == "FINISHED"
            metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
            assert metrics["test/accuracy"] == pytest.approx(0.83)
            tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
            assert tags["registered_version"] == store["version"]

            history = http.get("/api/2.0/mlflow/metrics/get-history", params={"run_id": store["run_id"], "metric_key": "train/loss"}).json()
            assert [(m["step"], m["value"]) for m in history["metrics"]] == [(1, pytest.approx(0.69)), (2, pytest.approx(0.41))]
            artifacts = http.get("/api/2.0/mlflow/artifacts/list", params={"run_id": store["run_id"]}).json()
            assert "confusion_matrix.json" in {f["path"] for f in artifacts["files"]}

            model = http.get("/api/2.0/mlflow/registered-models/get", params={"name": MODEL}).json()["registered_model"]
            assert {a["alias"]: a["version"] for a in model["aliases"]} == {"champion": store["version"]}
            champion = http.get("/api/2.0/mlflow/registered-models/alias", params={"name": MODEL, "alias": "champion"}).json()
            assert champion["model_version"]["version"] == store["version"]
            assert champion["model_version"]["run_id"] == store["run_id"]

            ui = http.get("/")
            assert ui.status_code == 200 and "text/html" in ui.headers["content-type"]
    finally:
        stop_group(process)


def test_start_script_daemon_takes_env_settings_and_proxies_artifacts(store, tmp_path):
    """The cluster path: env-configured server, a client writing artifacts over HTTP only."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    home = tmp_path / "mlflow-home"
    proxied_root = tmp_path / "proxied-artifacts"
    env = server_env(
        MLFLOW_HOME=str(home),
        MLFLOW_BACKEND_STORE_URI=store["tracking_uri"],
        MLFLOW_ARTIFACT_ROOT=str(proxied_root),
        MLFLOW_HOST="127.0.0.1",
        MLFLOW_PORT=str(port),
        MLFLOW_ALLOWED_HOSTS="imdb-mlflow,imdb-mlflow:*",  # a Kubernetes service name, as in raycluster.yaml
    )
    started = subprocess.run([str(START_SCRIPT), "--daemon"], env=env, capture_output=True, text=True, timeout=150)
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"up at http://127.0.0.1:{port}/health" in started.stdout
        assert (home / "server.pid").exists() and (home / "server.log").exists()
        # the script is idempotent: a second start finds the running server
        again = subprocess.run([str(START_SCRIPT), "--daemon"], env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and "already answers" in again.stdout

        # Host headers: the service name and localhost pass, anything else is refused (DNS rebinding)
        search = "/api/2.0/mlflow/experiments/search?max_results=1"
        assert httpx.get(base + search, headers={"Host": f"imdb-mlflow:{port}"}, timeout=10).status_code == 200
        assert httpx.get(base + search, headers={"Host": f"localhost:{port}"}, timeout=10).status_code == 200
        assert httpx.get(base + search, headers={"Host": "attacker.example"}, timeout=10).status_code in (400, 403)

        client = MlflowClient(tracking_uri=base, registry_uri=base)
        # what a job on a worker node sees: the registered champion
        assert client.get_model_version_by_alias(MODEL, "champion").run_id == store["run_id"]
        # a new experiment's artifacts go through the server into MLFLOW_ARTIFACT_ROOT
        experiment_id = client.create_experiment("cluster-run")
        assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
        run_id = client.create_run(experiment_id).info.run_id
        client.log_dict(run_id, {"ok": True}, "probe.json")
        client.set_terminated(run_id)
        assert list(proxied_root.rglob("probe.json")), "the artifact did not land under MLFLOW_ARTIFACT_ROOT"
    finally:
        stopped = subprocess.run([str(START_SCRIPT), "--stop"], env=env, capture_output=True, text=True, timeout=60)
    assert "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/health", timeout=1)
        except httpx.HTTPError:
            break
        time.sleep(0.5)
    else:
        pytest.fail("the server still answers after --stop")


def test_start_script_rejects_unknown_arguments_and_prints_help():
    bad = subprocess.run([str(START_SCRIPT), "--bogus"], capture_output=True, text=True, timeout=30, env=server_env())
    assert bad.returncode == 2 and "unknown argument" in bad.stderr
    usage = subprocess.run([str(START_SCRIPT), "--help"], capture_output=True, text=True, timeout=30, env=server_env())
    assert usage.returncode == 0 and "--daemon" in usage.stdout


# --- the cluster's tracking service, with real servers: PostgreSQL, S3 (moto), MLflow ---

BUCKET = "imdb-mlflow"
ARTIFACT_PREFIX = "artifacts"
CLUSTER_MODEL = "imdb-sentiment-cluster"

# What a job on a worker node does. Its environment holds the tracking URI and nothing else:
# no AWS variable, no ~/.aws; artifacts travel through the server's proxy.
CLIENT_SCRIPT = r"""
import json, os, sys, tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

assert not [k for k in os.environ if k.startswith("AWS_")], "the client must have no storage credentials"
client = MlflowClient()  # MLFLOW_TRACKING_URI
experiment_id = client.create_experiment("cluster-rehearsal")
run_id = client.create_run(experiment_id, run_name="pg-s3").info.run_id
client.log_param(run_id, "lr", "5e-05")
client.log_metric(run_id, "test/accuracy", 0.91, step=1)
client.log_dict(run_id, {"matrix": [[45, 5], [4, 46]]}, "confusion_matrix.json")
with tempfile.TemporaryDirectory() as folder:
    (Path(folder) / "weights.bin").write_bytes(b"\0" * 1024)
    client.log_artifacts(run_id, folder, "model")
client.set_terminated(run_id)
client.create_registered_model(sys.argv[1])
version = client.create_model_version(sys.argv[1], source=f"runs:/{run_id}/model", run_id=run_id)
client.set_registered_model_alias(sys.argv[1], "champion", version.version)
print(json.dumps({
    "run_id": run_id,
    "version": str(version.version),
    "artifact_location": client.get_experiment(experiment_id).artifact_location,
    "champion_run": client.get_model_version_by_alias(sys.argv[1], "champion").run_id,
    "matrix": mlflow.artifacts.load_dict(f"runs:/{run_id}/confusion_matrix.json")["matrix"],
}))
"""


@pytest.fixture(scope="module")
def cluster_tracking(tmp_path_factory):
    """S3 (moto) with a bucket, PostgreSQL, and the start script's server over both."""
    from tests.services import MlflowServer, PostgresServer, S3Server

    workdir = tmp_path_factory.mktemp("cluster-tracking")
    with S3Server(workdir) as s3, PostgresServer(workdir) as pg:
        s3.create_bucket(BUCKET)
        with MlflowServer(workdir, pg.uri, f"s3://{BUCKET}/{ARTIFACT_PREFIX}", extra_env=s3.env()) as server:
            yield SimpleNamespace(s3=s3, pg=pg, server=server, workdir=workdir)


@pytest.mark.timeout(150)
def test_server_over_postgres_and_s3_serves_a_client_that_has_only_the_tracking_uri(cluster_tracking, tmp_path):
    s3, pg, server = cluster_tracking.s3, cluster_tracking.pg, cluster_tracking.server
    env = {"PATH": os.defpath, "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": server.uri, "LANG": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, CLUSTER_MODEL], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = json.loads(done.stdout.strip().splitlines()[-1])
    run_id = client["run_id"]
    assert client["artifact_location"].startswith("mlflow-artifacts:")  # proxied, not s3:// for the client
    assert client["champion_run"] == run_id
    assert client["matrix"] == [[45, 5], [4, 46]]  # read back through the proxy

    # the backend store is PostgreSQL: the rows are there
    assert pg.query("SELECT status FROM runs WHERE run_uuid = %s", (run_id,)) == [("FINISHED",)]
    assert pg.query("SELECT key, value, step FROM metrics WHERE run_uuid = %s", (run_id,)) == [("test/accuracy", pytest.approx(0.91), 1)]
    assert pg.query("SELECT version, run_id FROM model_versions WHERE name = %s", (CLUSTER_MODEL,)) == [(int(client["version"]), run_id)]
    assert pg.query("SELECT alias, version FROM registered_model_aliases WHERE name = %s", (CLUSTER_MODEL,)) == [("champion", int(client["version"]))]

    # the artifacts are objects in the bucket, under the artifact root's prefix
    keys = s3.list_keys(BUCKET, ARTIFACT_PREFIX + "/")
    for name in ("confusion_matrix.json", "model/weights.bin"):
        assert [k for k in keys if k.endswith(f"/{run_id}/artifacts/{name}")], (name, keys)


def start_script_failure(tmp_path: Path, **settings: str) -> tuple[subprocess.CompletedProcess, float]:
    env = server_env(MLFLOW_HOME=str(tmp_path / "mlflow-home"), MLFLOW_HOST="127.0.0.1", MLFLOW_PORT=str(free_port()), **settings)
    started = time.monotonic()
    result = subprocess.run([str(START_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    return result, time.monotonic() - started


@pytest.mark.timeout(90)
def test_start_script_stops_with_one_line_when_postgres_does_not_answer(tmp_path):
    port = free_port()  # nothing listens there
    uri = f"postgresql://mlflow:hunter22@127.0.0.1:{port}/mlflow"
    result, took_s = start_script_failure(tmp_path, MLFLOW_BACKEND_STORE_URI=uri)
    assert result.returncode != 0 and took_s < 20, (result.returncode, took_s)
    assert result.stdout == ""  # the server never started
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"postgresql://mlflow:***@127.0.0.1:{port}/mlflow" in lines[0]
    assert "hunter22" not in result.stderr
    assert "refused" in lines[0].lower() or "could not connect" in lines[0].lower()


@pytest.mark.timeout(90)
def test_start_script_stops_with_one_line_when_the_artifact_bucket_is_missing(tmp_path):
    from tests.services import S3Server

    with S3Server(tmp_path) as s3:
        result, took_s = start_script_failure(
            tmp_path,
            MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/mlflow.db",
            MLFLOW_ARTIFACT_ROOT="s3://no-such-bucket/artifacts",
            **s3.env(),
        )
    assert result.returncode != 0 and took_s < 20, (result.returncode, took_s)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "no-such-bucket" in lines[0] and "no such bucket" in lines[0]
