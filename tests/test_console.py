"""What a person sees: `python -m pipelines.train_imdb` run as a user runs it, its output read.

A real subprocess with its own local Ray, the tiny model, the sample corpus and a fresh
storage root; then the MLflow store it wrote. The console must be short and quiet (no
library warnings, no line twice), show the stages and progress bars, and leave a run
whose page shows pictures, a description and its data; a failing run must say where it
failed and keep its log in MLflow. Both runs go in the lane beside the other tests (tests/lane.py).
The first run is tests/first_run.py's, made once for this test and tests/test_secrets.py: it
writes to a password-checking PostgreSQL, so what it left in MLflow is read while that is up.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.first_run import TIMEOUT_S as FIRST_RUN_TIMEOUT_S
from tests.first_run import first_run, train_args
from tests.lane import lane_result
from tests.tiny_model import build_in_subprocess

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60
STAGES = ("[data]", "[model]", "[resources]", "[training]", "[evaluation]", "[registration]")
# what must never reach the console: library warnings, Ray's internals, worker prefixes
NOISE = re.compile(r"warning(?!: )|Deprecat|core_worker|RayTrainWorker|TrainController|Traceback|INFO|ERROR", re.IGNORECASE)


def run_cli(args: list[str], storage: Path, env: dict | None = None, timeout_s: float = 420) -> subprocess.CompletedProcess:
    env = {**(os.environ if env is None else env), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)  # its own local Ray, as a user's first run
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.train_imdb", *args, "--storage", str(storage)],
        cwd=storage.parent, env=env, capture_output=True, text=True, timeout=timeout_s,
    )


def tiny_model(workdir: Path, env: dict) -> str:
    """The tests' tiny BERT, built in a process of its own (it seeds torch: not in the lane's thread)."""
    return build_in_subprocess(workdir, env)[0]


def screen_lines(output: str) -> list[str]:
    """Lines as a terminal shows them: a carriage return redraws the line."""
    return [line.split("\r")[-1] for line in output.splitlines()]


def mlflow_client(storage: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)  # not the registry another test set process-wide


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.lane(first_run, timeout_s=FIRST_RUN_TIMEOUT_S)
def test_train_cli_prints_a_short_quiet_console_and_leaves_a_full_run(request):
    """A user's first run (tests/first_run.py: the one that tests/test_secrets.py searches for secrets too)."""
    result = lane_result(request, first_run)
    output = result["output"]
    assert result["returncode"] == 0, output[-4000:]
    lines = screen_lines(output)
    assert len(lines) <= MAX_LINES, f"{len(lines)} lines:\n{output}"
    said = [line for line in lines if line.strip()]
    repeated = sorted({line for line in said if said.count(line) > 1})
    assert not repeated, f"printed twice: {repeated}"
    noisy = [line for line in lines if NOISE.search(line)]
    assert not noisy, f"library output on the console: {noisy}"
    for stage in STAGES:
        assert any(line.startswith(stage) for line in lines), f"no {stage} line in:\n{output}"
    for bar in ("tokenize train", "epoch 1/2", "epoch 2/2", "epoch 1 validation", "test", "score torch", "score onnx", "score onnx-int8"):
        assert any(line.startswith(f"{bar}:") and "100%" in line for line in lines), f"no finished {bar!r} bar in:\n{output}"

    log_file = Path(lines[0].split()[1])
    assert lines[0].startswith("log: ") and log_file.is_file()
    full_log = log_file.read_text(errors="replace")
    assert "RayTrainWorker" in full_log  # the workers' output went to the log file
    assert full_log.count("[train] epoch 1: checkpoint stored in") == 1, "a worker line reached the log twice"

    run = result["mlflow"]
    assert run["status"] == "FINISHED"
    assert "console.log" in run["artifacts"]
    assert {"pictures/confusion_matrix.png", "pictures/training_curves.png", "pictures/roc_pr_curves.png"} <= run["artifacts"]
    assert "test accuracy" in run["note"]
    assert run["inputs"] == {("train", "training"), ("val", "validation"), ("test", "test")}
    assert 0.0 <= run["metrics"]["test/roc_auc"] <= 1.0
    assert run["step_losses"] == 6  # 3 steps x 2 epochs
    assert "## Evaluation" in run["card"] and run["run_id"] in run["card"] and "synthetic" in run["card"]


def run_on_damaged_shards(workdir: Path, env: dict) -> tuple[subprocess.CompletedProcess, Path]:
    """The sample prepared, every train shard then damaged, and a run on it; (the run's process, the storage root)."""
    storage = workdir / "storage"
    prepared = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare_imdb", "--source", "sample", "--name", "sample", "--storage", str(storage), "--no-progress"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    # damage every train shard in place, keeping its size (a disk or copy fault, not a cut
    # file, which the size check would catch before the run starts): reading it fails
    for shard in (storage / "datasets" / "sample").glob("*/train/*.parquet"):
        data = bytearray(shard.read_bytes())
        data[len(data) // 4: len(data) * 3 // 4] = b"\x00" * (len(data) * 3 // 4 - len(data) // 4)
        shard.write_bytes(bytes(data))
    return run_cli([*train_args(tiny_model(workdir, env)), "--max-failures", "0"], storage, env), storage


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.lane(run_on_damaged_shards, timeout_s=400, light=True)
def test_a_failing_run_names_its_stage_and_log_and_keeps_the_log_in_mlflow(request):
    result, storage = lane_result(request, run_on_damaged_shards)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]  # bad data: the user's to fix
    last = screen_lines(result.stderr)[-2:]
    assert last[0].startswith("error: ") and "the train split cannot be read" in last[0] and "datasets/sample" in last[0], result.stderr
    assert last[1].startswith("failed in stage: tokenize; full log: "), result.stderr
    log_file = Path(last[1].split("full log: ")[1])
    assert "Traceback" in log_file.read_text(errors="replace")
    assert "Traceback" not in result.stdout + result.stderr

    client = mlflow_client(storage)
    runs = client.search_runs([client.get_experiment_by_name("imdb-sentiment").experiment_id], order_by=["attributes.start_time DESC"])
    failed = runs[0]
    assert failed.info.status == "FAILED"
    assert "console.log" in {a.path for a in client.list_artifacts(failed.info.run_id)}


@pytest.mark.timeout(60)
def test_a_bad_flag_exits_2_with_one_line_and_no_log(tmp_path):
    env = {**os.environ}
    result = subprocess.run(
        [sys.executable, "-m", "pipelines.train_imdb", "--data", str(tmp_path / "nowhere"), "--storage", str(tmp_path / "s")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=50,
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors[0].startswith("error: ") and "nowhere" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


SESSION_SCRIPT = """
import logging, os, sys
from pathlib import Path
from pipelines.core import console
logging.basicConfig(level=logging.INFO)
with console.session("unit", Path(sys.argv[1])) as log_file:
    print("library chatter")
    os.write(2, b"a C++ core line\\n")
    logging.getLogger("ray.data").warning("an internal warning")
    console.stage("data", "3 reviews")
    with console.progress(3, "tokenize", unit="reviews") as bar:
        bar.update(3)
print("after the session")
"""


@pytest.mark.timeout(60)
def test_session_sends_library_output_to_the_log_and_gives_the_terminal_back(tmp_path):
    result = subprocess.run([sys.executable, "-c", SESSION_SCRIPT, str(tmp_path / "logs")], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert result.returncode == 0, result.stderr
    shown = result.stdout.splitlines()
    log_file = next((tmp_path / "logs").glob("unit-*.log"))
    assert shown[0].startswith(f"log: {log_file}")
    assert shown[1:] == ["[data] 3 reviews", shown[2], "after the session"] and shown[2].startswith("tokenize: 100%|")
    assert result.stderr == ""
    logged = log_file.read_text()
    for line in ("library chatter", "a C++ core line", "an internal warning", "[data] 3 reviews", "tokenize: 100%"):
        assert line in logged
    assert "after the session" not in logged


@pytest.mark.timeout(30)
def test_serve_tells_where_it_listens_and_how_to_call_it(monkeypatch):
    from serve.app import ready_lines

    monkeypatch.delenv("SERVE_API_KEY", raising=False)
    monkeypatch.delenv("SERVE_API_KEY_FILE", raising=False)
    where, example = ready_lines("0.0.0.0", 8123, "/", "models:/imdb-sentiment/4")
    assert where.startswith("[serve] models:/imdb-sentiment/4 at http://127.0.0.1:8123/v1/predict")
    assert example.startswith("try: curl -s http://127.0.0.1:8123/v1/predict") and "Authorization" not in example
    monkeypatch.setenv("SERVE_API_KEY", "k" * 32)
    _, example = ready_lines("127.0.0.1", 8123, "/api/", "models:/imdb-sentiment/4")
    assert "http://127.0.0.1:8123/api/v1/predict" in example and 'Authorization: Bearer $SERVE_API_KEY' in example
    assert "k" * 32 not in example  # the key itself is never printed


FAILING_SCRIPT = """
import sys
from pathlib import Path
from pipelines.core import cli, console

def main(argv):
    with console.session("unit", Path(sys.argv[1])):
        console.stage("training", "started")
        raise RuntimeError("the cluster went away\\nsecond line")

cli.run_main(main, [])
"""


@pytest.mark.timeout(60)
def test_a_platform_failure_exits_1_with_its_stage_and_the_traceback_only_in_the_log(tmp_path):
    result = subprocess.run([sys.executable, "-c", FAILING_SCRIPT, str(tmp_path / "logs")], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert result.returncode == 1
    log_file = next((tmp_path / "logs").glob("unit-*.log"))
    assert result.stderr.splitlines() == [
        "error: RuntimeError: the cluster went away",
        f"failed in stage: training; full log: {log_file}",
    ]
    assert "Traceback" in log_file.read_text() and "second line" in log_file.read_text()


INTERRUPTED_SCRIPT = """
import atexit, logging, os, sys, threading, time
from pathlib import Path
from pipelines.core import cli, console

def main(argv):
    # what libraries do on the way out: an atexit hook printing, a thread logging late
    atexit.register(lambda: print("an atexit hook's last words"))
    late = threading.Thread(target=lambda: (time.sleep(0.5), logging.getLogger("mlflow").info("a late library line")))
    with console.session("unit", Path(sys.argv[1])):
        console.stage("sweep", "2 trials")
        late.start()
        raise KeyboardInterrupt

try:
    cli.run_main(main, [])
finally:
    time.sleep(1)  # the late thread logs after the session ended
"""


@pytest.mark.timeout(60)
def test_an_entry_point_keeps_what_is_printed_after_its_session_in_the_log(tmp_path):
    """Ctrl-C: the console gets the stage and two lines; late library output goes to the log, not the console."""
    result = subprocess.run([sys.executable, "-c", INTERRUPTED_SCRIPT, str(tmp_path / "logs")], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert result.returncode == 130
    log_file = next((tmp_path / "logs").glob("unit-*.log"))
    assert result.stdout.splitlines()[1:] == ["[sweep] 2 trials"], result.stdout
    assert result.stderr.splitlines() == ["interrupted", f"failed in stage: sweep; full log: {log_file}"]
    logged = log_file.read_text()
    for line in ("an atexit hook's last words", "a late library line", "interrupted", "failed in stage: sweep"):
        assert line in logged


@pytest.mark.timeout(30)
def test_a_library_run_tees_its_output_into_a_log_that_goes_once_uploaded(tmp_path, monkeypatch, capsys):
    """Without a console session (a test, a notebook) the run's log is a tee in a temporary
    folder: it must hold what was printed while the block runs, and leave nothing behind."""
    import tempfile

    from pipelines.core import console
    from pipelines.tracking import run_log

    assert not console.active()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with run_log.console_log() as log_path:
        print("epoch 1: loss 0.69")
        sys.stdout.flush()
        assert log_path.is_relative_to(tmp_path) and "epoch 1: loss 0.69" in log_path.read_text()
    assert "epoch 1: loss 0.69" in capsys.readouterr().out, "the tee still prints"
    assert list(tmp_path.iterdir()) == []
