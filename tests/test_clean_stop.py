"""A clean stop: SIGINT or SIGTERM to the process of a command ends all it started, within 30 s.

`python -m serve.app`, `python -m pipelines.train_imdb` and `python -m tune.tune_imdb` run as a
user runs them, each with its own local Ray, on the tiny BERT (and a small prepared corpus).
Once a command is in its steady work (Serve answers /healthz, Train workers run, a trial
trains), one signal goes to its pid alone, not to its process group, as `kill` or a service
manager sends it. It must exit within 30 s with 130 (SIGINT) or 143 (SIGTERM), say so in one
line, mark its MLflow run KILLED and leave no process behind: none of its session (each
command starts one of its own here, so orphans keep its id), none with its TMPDIR.

One signal per command, to keep the suite's time: serve.app gets SIGTERM (a service manager's),
train_imdb SIGINT (Ctrl-C), tune_imdb SIGTERM (and is then resumed with --resume). The entry points without Ray (the end of this
file) get every signal, and SIGINT when started the way a script's background job is, with
SIGINT ignored: Python then keeps ignoring it unless the entry point takes it
(pipelines.core.stopping). Each command is a job of the lane beside the other tests (tests/lane.py).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from pipelines.core.ports import free_port
from tests.lane import RUNNING, lane_result
from tests.tiny_model import build_in_subprocess

REPO = Path(__file__).resolve().parents[1]
STOP_LIMIT_S = 30.0  # what the commands promise
READY_TIMEOUT_S = 150.0
STOPPED_LINE = {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated (SIGTERM)"}
MODEL_NAME = "stop-test"

# the tiny BERT registered as MODEL_NAME@champion in the SQLite store under a storage root
REGISTER_SCRIPT = """
import sys
import mlflow
import mlflow.transformers
from mlflow.tracking import MlflowClient
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from pipelines.tracking import runs, store_uri
from pipelines.tracking.registration import model_requirements

model_dir, storage, name = sys.argv[1:4]
tracking_uri, artifact_root = store_uri.configure(storage)
with mlflow.start_run(experiment_id=runs.ensure_experiment("clean-stop", artifact_root)):
    mlflow.log_params({"max_length": 32, "truncation": "head"})
    model = {"model": AutoModelForSequenceClassification.from_pretrained(model_dir), "tokenizer": AutoTokenizer.from_pretrained(model_dir)}
    mlflow.transformers.log_model(transformers_model=model, name="model", task="text-classification",
                                  registered_model_name=name, pip_requirements=model_requirements())
MlflowClient(tracking_uri).set_registered_model_alias(name, "champion", "1")
"""


# --- the processes of one command ----------------------------------------------------------

def pause(seconds: float) -> None:
    threading.Event().wait(seconds)  # not time.sleep, which a test in the main thread may patch (tests/lane.py)


def processes_of(session_id: int, tmp: str) -> dict[int, str]:
    """pid -> command line of every live process in the session `session_id`, or whose environment has TMPDIR=`tmp`."""
    found = {}
    marker = f"TMPDIR={tmp}".encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
            if fields[0] == b"Z":
                continue  # ended; its parent has not collected it yet
            in_session = int(fields[3]) == session_id
            if not in_session:
                with open(f"/proc/{name}/environ", "rb") as environ:
                    in_session = marker in environ.read().split(b"\0")
            if in_session:
                with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                    found[int(name)] = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
    return found


def has_process(processes: dict[int, str], title: str) -> bool:
    return any(command.startswith(title) for command in processes.values())


def run_and_stop(command: list[str], env: dict, signum: int, ready: Callable[[str, dict[int, str]], bool], log: Path,
                 settle_s: float = 0.0) -> dict:
    """Start `command` in a session of its own, wait until `ready(output, its processes)`, send `signum` to its pid.

    Returns what the test asserts on: exit code, seconds from the signal to the exit, the
    output, and the processes before the signal and after the exit.
    """
    # Ray's session folder and sockets under a TMPDIR of this run only (short: socket paths are limited)
    tmp = tempfile.mkdtemp(prefix="stop-", dir="/tmp" if Path("/tmp").is_dir() else None)
    env = {**env, "TMPDIR": tmp}
    result: dict = {"signal": signal.Signals(signum).name, "ready": False}
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    RUNNING.add(process)
    left: dict[int, str] = {}
    try:
        started = time.monotonic()
        while not ready(log.read_text(errors="replace"), processes_of(process.pid, tmp)):
            if process.poll() is not None or time.monotonic() - started > READY_TIMEOUT_S:
                result["output"] = log.read_text(errors="replace")
                return result
            pause(0.5)
        pause(settle_s)
        before = processes_of(process.pid, tmp)
        result.update(ready=True, ready_s=time.monotonic() - started, before=before)
        sent = time.monotonic()
        os.kill(process.pid, signum)
        # a blocking wait and a timer (tests/lane.py says why not wait(timeout=))
        timer = threading.Timer(STOP_LIMIT_S + 30, process.kill)
        timer.start()
        try:
            returncode = process.wait()
        finally:
            timer.cancel()
        result.update(returncode=returncode, stop_s=time.monotonic() - sent)
        # a process that got SIGKILL a moment before the exit may still be going away
        for _ in range(30):
            left = processes_of(process.pid, tmp)
            if not left:
                break
            pause(0.1)
        result.update(left=left, output=log.read_text(errors="replace"))
        return result
    finally:
        RUNNING.discard(process)
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in {**left, **processes_of(process.pid, tmp)}:  # never leave them to the rest of the suite
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)


def command_env(env: dict) -> dict:
    env = {key: value for key, value in env.items() if key not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "SERVE_API_KEY", "SERVE_API_KEY_FILE")}
    return {**env, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def summary(results: list[dict]) -> str:
    return "; ".join(f"{r['signal']}: exit {r.get('returncode')} after {r.get('stop_s', 0):.1f} s, "
                     f"{len(r.get('before', {}))} processes before, {len(r.get('left', {}))} after" for r in results)


def assert_stopped_cleanly(result: dict, stopped_line: str) -> None:
    output = result.get("output", "")
    assert result["ready"], f"never reached its steady work ({result['signal']}):\n{output[-4000:]}"
    signum = signal.Signals[result["signal"]]
    assert result["stop_s"] <= STOP_LIMIT_S, f"{result['signal']}: exited after {result['stop_s']:.1f} s\n{output[-3000:]}"
    assert result["returncode"] == 128 + signum, f"{result['signal']}: exit code {result['returncode']}\n{output[-3000:]}"
    said = [line for line in output.splitlines() if re.fullmatch(r"(\[serve\] )?(interrupted|terminated \(SIGTERM\))(: shutting down)?", line)]
    assert said == [stopped_line], f"{result['signal']}: the stop lines are {said}\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    assert len(result["before"]) >= 8, f"Ray had not started? {result['before']}"
    assert result["left"] == {}, f"{result['signal']}: left behind {result['left']}"


def mlflow_client(storage: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{storage / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def all_runs(storage: Path) -> list:
    client = mlflow_client(storage)
    return client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])


# --- serve.app ------------------------------------------------------------------------------

def stop_serve(workdir: Path, env: dict) -> list[dict]:
    """The tiny BERT registered and served; stopped by SIGTERM, as a service manager stops it.

    SIGTERM alone, to keep the suite's time: SIGINT to an entry point started with it ignored
    (a script's background job) is tested without Ray below, where the handling lives
    (pipelines.core.stopping), and SIGINT with Ray on train_imdb.
    """
    env = command_env(env)
    model, _, _ = build_in_subprocess(workdir, env)
    storage = workdir / "storage"
    subprocess.run([sys.executable, "-c", REGISTER_SCRIPT, model, str(storage), MODEL_NAME], cwd=REPO, env=env,
                   check=True, capture_output=True, timeout=180)
    port = free_port()

    def ready(output: str, processes: dict[int, str]) -> bool:
        if "Ctrl-C stops" not in output:  # printed once serve.run returned: the app is up
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
                return answer.status == 200
        except OSError:
            return False

    command = [sys.executable, "-m", "serve.app", "--storage", str(storage), "--model-name", MODEL_NAME,
               "--host", "127.0.0.1", "--port", str(port), "--max-replicas", "1"]
    return [run_and_stop(command, env, signal.SIGTERM, ready, workdir / "serve.log")]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.lane(stop_serve, timeout_s=120)
def test_serve_stops_cleanly_on_sigterm(request):
    results = lane_result(request, stop_serve)
    print(summary(results))
    for result in results:
        assert_stopped_cleanly(result, f"[serve] {STOPPED_LINE[signal.Signals[result['signal']]]}: shutting down")
        assert has_process(result["before"], "ray::ServeReplica"), result["before"]


# --- train_imdb and tune_imdb ---------------------------------------------------------------

def training_args(workdir: Path, env: dict) -> list[str]:
    """The tiny BERT on a small corpus; epochs enough that the signal always lands mid-run (it never runs them all)."""
    model, dataset, _ = build_in_subprocess(workdir, env, corpus_per_label=60, seed=7)
    return ["--data", dataset, "--model", model, "--storage", str(workdir / "storage"), "--epochs", "20", "--max-length", "32",
            "--eval-batch-size", "64", "--no-onnx-variants"]


def stop_training(workdir: Path, env: dict) -> tuple[list[dict], Path]:
    """`python -m pipelines.train_imdb` stopped by SIGINT (to its process alone) once its Train workers run.

    One signal per training command, to keep the suite's time: SIGTERM does what SIGINT does
    at that moment (Train's own Ctrl-C handler), and the sweep below is stopped by SIGTERM;
    every signal reaches the entry points without Ray below.
    """
    env = command_env(env)
    command = [sys.executable, "-m", "pipelines.train_imdb", *training_args(workdir, env), "--batch-size", "8", "--register-as", "stop-train"]

    def ready(output: str, processes: dict[int, str]) -> bool:
        return "[training] MLflow run" in output and has_process(processes, "ray::RayTrainWorker")

    results = [run_and_stop(command, env, signal.SIGINT, ready, workdir / "train.log", settle_s=2)]
    return results, workdir / "storage"


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.lane(stop_training, timeout_s=100)
def test_training_stops_cleanly_on_sigint(request):
    results, storage = lane_result(request, stop_training)
    print(summary(results))
    for result in results:
        assert_stopped_cleanly(result, STOPPED_LINE[signal.Signals[result["signal"]]])
        assert "failed in stage: training" in result["output"]
    runs = all_runs(storage)
    assert len(runs) == 1 and {run.info.status for run in runs} == {"KILLED"}, [(run.info.run_name, run.info.status) for run in runs]


SWEEP_NAME = "stop-me"
# the console of a sweep: stage lines and trial events; Ray, Tune and the trials write to the log file
QUIET_LINE = re.compile(r"(log: |\[(data|model|resources|sweep|trial \S+)\] |warning: |interrupted|terminated \(SIGTERM\)|error: |failed in stage: )")


def run_summaries(storage: Path) -> list[dict]:
    """Every MLflow run under `storage`: name, status, parent or trial, params and tags."""
    return [{"name": run.info.run_name, "status": run.info.status, "parent": "mlflow.parentRunId" not in run.data.tags,
             "run_id": run.info.run_id, "params": dict(run.data.params), "tags": dict(run.data.tags)} for run in all_runs(storage)]


def stop_sweep(workdir: Path, env: dict) -> dict:
    """`python -m tune.tune_imdb` (2 trials, one at a time) stopped by SIGTERM while its first trial trains,
    then `--resume` of it run to its end, as a user continues a sweep a service manager stopped.

    The sweep also sweeps warmup_ratio: a field other than lr given on the command line reaches each trial's run.
    """
    env = command_env(env)
    model, dataset, _ = build_in_subprocess(workdir, env, corpus_per_label=60, seed=7)
    storage = workdir / "storage"
    command = [sys.executable, "-m", "tune.tune_imdb", "--data", dataset, "--model", model, "--storage", str(storage),
               # two epochs of a few steps: the signal lands in the first trial (ready + 2 s), and the resume is short
               "--epochs", "2", "--max-steps-per-epoch", "4", "--max-length", "32", "--eval-batch-size", "64", "--no-onnx-variants",
               "--batch-sizes", "8", "--num-samples", "2", "--max-concurrent", "1", "--scheduler", "fifo", "--metric", "val/loss",
               "--space", "warmup_ratio=uniform:0:0.1", "--lr-min", "1e-4", "--lr-max", "1e-2",
               "--register-as", "stop-sweep", "--sweep-name", SWEEP_NAME]

    def ready(output: str, processes: dict[int, str]) -> bool:
        return re.search(r"^\[trial \S+\] started", output, re.MULTILINE) is not None and has_process(processes, "ray::RayTrainWorker")

    stopped = run_and_stop(command, env, signal.SIGTERM, ready, workdir / "sweep.log", settle_s=2)
    outcome = {"stopped": stopped, "runs_after_stop": run_summaries(storage)}
    marker = storage / "tune_results" / SWEEP_NAME / "mlflow_parent_run_id"
    outcome["parent_run_id"] = marker.read_text().strip() if marker.exists() else None
    if stopped.get("returncode") != 128 + signal.SIGTERM:
        return outcome  # the test reports the stop; nothing to resume
    resumed = subprocess.run([*command, "--resume"], cwd=REPO, env={**env, "TMPDIR": tempfile.mkdtemp(prefix="resume-", dir="/tmp")},
                             capture_output=True, text=True, timeout=360, check=False)
    outcome.update(resume_returncode=resumed.returncode, resume_output=resumed.stdout + resumed.stderr, runs_after_resume=run_summaries(storage))
    return outcome


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.lane(stop_sweep, timeout_s=540)  # 117-133 s alone, 171-278 s beside the suite
def test_a_sweep_stops_cleanly_on_sigterm_and_resumes_in_the_same_mlflow_run(request):
    outcome = lane_result(request, stop_sweep)
    stopped = outcome["stopped"]
    print(summary([stopped]))
    assert_stopped_cleanly(stopped, STOPPED_LINE[signal.SIGTERM])
    assert "--resume" in stopped["output"], "Tune saved the sweep: the console says how to continue it"
    lines = stopped["output"].splitlines()
    assert lines and lines[0].startswith("log: ") and len(lines) < 40, lines
    assert not [line for line in lines if not QUIET_LINE.match(line)], "the console holds more than stage lines and trial events"
    before = outcome["runs_after_stop"]
    parents, trials = [r for r in before if r["parent"]], [r for r in before if not r["parent"]]
    assert len(parents) == 1 and {r["status"] for r in parents} == {"KILLED"}, before
    assert trials and {r["status"] for r in trials} == {"KILLED"}, before
    assert outcome["parent_run_id"] == parents[0]["run_id"]

    # --resume: the unfinished trial and the one not yet started run, into the same parent run
    assert outcome["resume_returncode"] == 0, outcome["resume_output"][-3000:]
    after = outcome["runs_after_resume"]
    parents, trials = [r for r in after if r["parent"]], [r for r in after if not r["parent"]]
    assert [r["run_id"] for r in parents] == [outcome["parent_run_id"]] and parents[0]["status"] == "FINISHED", after
    assert len(trials) == 2 and {r["status"] for r in trials} == {"FINISHED"}, after
    assert f"=== sweep {SWEEP_NAME} finished: 2 trials ===" in outcome["resume_output"], outcome["resume_output"][-3000:]
    assert "registered: models:/stop-sweep/1 " in outcome["resume_output"], outcome["resume_output"][-3000:]
    for trial in trials:
        assert 0 <= float(trial["params"]["warmup_ratio"]) <= 0.1
        assert trial["tags"]["swept"] == "batch_size,lr,warmup_ratio"


# --- the pieces, without Ray (pipelines.core.stopping) ---------------------------------------

ENTRY_POINT_SCRIPT = """
import signal, sys, time
from pipelines.core import cli, stopping

def main(argv):
    if sys.argv[1] == "library":  # a library's own Ctrl-C handler, as Tune's: SIGTERM must reach it too
        def tune_like(signum, frame):
            print(f"library handler got {signal.Signals(signum).name}", flush=True)
            raise KeyboardInterrupt
        with stopping.kept_handlers():
            signal.signal(signal.SIGINT, tune_like)
            print("ready", flush=True)
            time.sleep(60)
    print("ready", flush=True)
    time.sleep(60)

cli.run_main(main, [])
"""


def run_entry_point(mode: str, signum: int, sigint_ignored: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", ENTRY_POINT_SCRIPT, mode]
    if sigint_ignored:
        command = ["/bin/sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signum)
        out, err = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return subprocess.CompletedProcess(command, process.returncode, "ready\n" + out, err)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("signum", "sigint_ignored"), [(signal.SIGINT, False), (signal.SIGINT, True), (signal.SIGTERM, False)])
def test_an_entry_point_stops_on_sigint_and_sigterm_with_one_line_and_128_plus_the_signal(signum, sigint_ignored):
    result = run_entry_point("plain", signum, sigint_ignored)
    assert result.returncode == 128 + signum, result
    assert result.stderr.splitlines() == [STOPPED_LINE[signum]], result.stderr


@pytest.mark.timeout(60)
def test_sigterm_goes_through_a_librarys_ctrl_c_handler():
    result = run_entry_point("library", signal.SIGTERM)
    assert "library handler got SIGINT" in result.stdout, result
    assert result.returncode == 143 and result.stderr.splitlines() == ["terminated (SIGTERM)"], result


TREE_SCRIPT = 'sleep 300 & sleep 300 & echo started; wait'


@pytest.mark.timeout(60)
def test_the_processes_below_a_killed_parent_are_ended():
    """As the raylet's agents when ray.shutdown() kills the raylet: noted before, orphaned, then ended."""
    from pipelines.core import stopping

    parent = subprocess.Popen(["/bin/sh", "-c", TREE_SCRIPT], stdout=subprocess.PIPE, text=True)
    below: set[tuple[int, int]] = set()
    try:
        assert parent.stdout.readline() == "started\n"
        below = stopping.descendants(stopping.identify([parent.pid]))
        assert len(below) == 3, below  # the shell and its two sleeps
        parent.kill()
        parent.wait()
        orphans = stopping.alive(below)
        assert len(orphans) == 2, "the sleeps outlive their parent"
        assert stopping.end_processes(below, grace_s=5) == orphans
        assert stopping.alive(below) == set()
    finally:
        parent.kill()
        parent.wait()
        for pid, _ in stopping.alive(below):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.timeout(30)
def test_an_entry_point_run_inside_a_process_gives_its_signal_handlers_back():
    from pipelines.core import cli

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(lambda argv: 0, [])
    assert exit_info.value.code == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
