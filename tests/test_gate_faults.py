"""The champion gate fails closed, proved against a real MLflow server with faults injected.

A real MLflow server (tests/services.py, SQLite behind it) and, in front of it, a proxy
(tests/fault_proxy.py) that answers one call of the gate with a 503, holds it past the
client's timeout, or resets the connection. For every call the gate makes and every fault:
nothing is promoted that was not compared and did not win, the version says what happened
(`gate.decision=error` and the reason), and the error is one line. Then two registrations that
finish together, and `python -m pipelines.promote` run as a user would, with the registry down
and back. Last, a registration killed (kill -9) at each of its steps and run again: one version
of the run, whole and promoted (a job of the lane beside the other tests, tests/lane.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipelines.tracking import registry
from tests.fault_proxy import Fault, FaultProxy
from tests.lane import lane_result
from tests.services import MlflowServer
from tests.tiny_model import build_in_subprocess

REPO = Path(__file__).resolve().parents[1]
DATASET = "d" * 64
# the gate's calls to the registry, by REST endpoint
CALLS = {
    "read the model (its aliases)": ("GET", "/registered-models/get"),
    "read the champion version": ("GET", "/model-versions/get"),
    "write a version tag": ("POST", "/model-versions/set-tag"),
    "move the alias": ("POST", "/registered-models/alias"),
}
FAULTS = ("503", "timeout", "reset")
CLIENT_TIMEOUT_S = 1  # MLFLOW_HTTP_REQUEST_TIMEOUT in these tests: the proxy holds a "timeout" for 6 s

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def gate_server(tmp_path_factory):
    """A real MLflow server and the fault proxy in front of it: (direct URI, proxy)."""
    workdir = tmp_path_factory.mktemp("gate-mlflow")
    with MlflowServer(workdir, f"sqlite:///{workdir / 'mlflow.db'}", str(workdir / "artifacts")) as server:
        proxy = FaultProxy(server.uri).start()
        yield server.uri, proxy
        proxy.stop()


@pytest.fixture
def fast_failing_client(monkeypatch):
    """The MLflow client as the platform runs it, minus the retries (a fault is one answer here)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(CLIENT_TIMEOUT_S))


def client_of(uri: str) -> MlflowClient:
    return MlflowClient(uri, registry_uri=uri)


def model_with_champion(direct: MlflowClient, champion_accuracy: float, *candidates: float, dataset: str = DATASET) -> tuple[str, list[str]]:
    """A registered model whose v1 is @champion at `champion_accuracy` on `dataset`, and a version per candidate (untagged)."""
    name = f"gate-{uuid.uuid4().hex[:8]}"
    direct.create_registered_model(name)
    versions = []
    for _ in range(1 + len(candidates)):
        versions.append(str(direct.create_model_version(name, source=f"s3://models/{name}", run_id=None).version))
    direct.set_model_version_tag(name, versions[0], registry.ACCURACY_TAG, f"{champion_accuracy:.6f}")
    direct.set_model_version_tag(name, versions[0], registry.DATASET_TAG, dataset)
    direct.set_registered_model_alias(name, registry.CHAMPION, versions[0])
    return name, versions[1:]


def champion_of(direct: MlflowClient, name: str) -> str:
    return str(direct.get_model_version_by_alias(name, registry.CHAMPION).version)


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("call", list(CALLS))
def test_a_registry_fault_at_any_call_of_the_gate_promotes_nothing(gate_server, fast_failing_client, call, fault):
    uri, proxy = gate_server
    direct = client_of(uri)
    name, (candidate,) = model_with_champion(direct, 0.70, 0.80)
    method, path = CALLS[call]
    proxy.arm(Fault(method, path, fault, hang_s=CLIENT_TIMEOUT_S * 3))
    with pytest.raises(registry.GateError) as error:
        registry.apply_gate(client_of(proxy.url), name, candidate, "auto", 0.80, DATASET)
    assert proxy.fired(), f"the {fault} on {call} never fired: {proxy.log}"
    proxy.clear()
    message = str(error.value)
    assert "\n" not in message and "not promoted" in message and f"pipelines.promote --model-name {name} --version {candidate}" in message
    # the candidate was better: but it was not compared and recorded whole, so it must not be champion ...
    assert champion_of(direct, name) == "1", f"{call} answered {fault}: the alias moved anyway"
    # ... and it says why (the fault hit one call; the tag after it went through)
    tags = direct.get_model_version(name, candidate).tags
    assert tags[registry.DECISION_TAG] == registry.ERROR, tags
    assert tags["gate.reason"], tags


# the calls after the alias moved: the read-back of the model's aliases, then the search for a better concurrent rival
CALLS_AFTER_THE_MOVE = {"read back the aliases": "/registered-models/get", "search the versions for a better rival": "/model-versions/search"}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("call", list(CALLS_AFTER_THE_MOVE))
def test_a_fault_after_the_alias_moved_leaves_a_champion_that_was_compared_and_won(gate_server, fast_failing_client, call, fault):
    """A call after the move fails: the move stands (the candidate beat the champion it read), the run still fails."""
    uri, proxy = gate_server
    direct = client_of(uri)
    name, (candidate,) = model_with_champion(direct, 0.70, 0.80)
    proxy.arm(Fault("GET", CALLS_AFTER_THE_MOVE[call], fault, after="/registered-models/alias", hang_s=CLIENT_TIMEOUT_S * 3))
    with pytest.raises(registry.GateError):
        registry.apply_gate(client_of(proxy.url), name, candidate, "auto", 0.80, DATASET)
    assert proxy.fired()
    proxy.clear()
    assert champion_of(direct, name) == candidate
    tags = direct.get_model_version(name, candidate).tags
    assert tags["gate.champion_version"] == "1" and float(tags["gate.candidate_accuracy"]) > float(tags["gate.champion_accuracy"])
    assert tags[registry.DECISION_TAG] == registry.ERROR
    # the gate run again once the registry answers: the version is champion already, and says so
    decision = registry.apply_gate(client_of(uri), name, candidate, "auto", 0.80, DATASET)
    assert decision.promote and direct.get_model_version(name, candidate).tags[registry.DECISION_TAG] == registry.PROMOTED


def test_the_registry_down_for_good_promotes_nothing(gate_server, fast_failing_client):
    uri, proxy = gate_server
    direct = client_of(uri)
    name, (candidate,) = model_with_champion(direct, 0.70, 0.80)
    proxy.arm(Fault("GET", "/", "503", times=None), Fault("POST", "/", "503", times=None))
    with pytest.raises(registry.GateError, match="not promoted"):
        registry.apply_gate(client_of(proxy.url), name, candidate, "auto", 0.80, DATASET)
    proxy.clear()
    assert champion_of(direct, name) == "1"
    assert registry.DECISION_TAG not in direct.get_model_version(name, candidate).tags, "no tag could be written; none was"


def test_the_record_is_written_before_the_alias_moves(gate_server):
    """The model card (before_promotion) fails: the alias has not moved."""
    uri, _ = gate_server
    direct = client_of(uri)
    name, (candidate,) = model_with_champion(direct, 0.70, 0.80)

    def card_fails(decision):
        raise OSError("the model card could not be written")

    with pytest.raises(registry.GateError, match="model card"):
        registry.apply_gate(client_of(uri), name, candidate, "auto", 0.80, DATASET, before_promotion=card_fails)
    assert champion_of(direct, name) == "1"


@pytest.mark.parametrize("first", ["better", "worse"])
def test_two_registrations_finishing_together_leave_the_better_as_champion(gate_server, first):
    uri, _ = gate_server
    direct = client_of(uri)
    name, (better, worse) = model_with_champion(direct, 0.60, 0.80, 0.70)
    accuracy = {better: 0.80, worse: 0.70}
    order = [better, worse] if first == "better" else [worse, better]
    start, errors, decisions = threading.Barrier(2), [], {}

    def register(version: str) -> None:
        start.wait()
        try:
            decisions[version] = registry.apply_gate(client_of(uri), name, version, "auto", accuracy[version], DATASET)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(version,)) for version in order]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    assert champion_of(direct, name) == better
    assert direct.get_model_version(name, better).tags[registry.DECISION_TAG] == registry.PROMOTED
    # the worse either lost at once, or held the alias for a moment and says who took it
    tags = direct.get_model_version(name, worse).tags
    assert tags[registry.DECISION_TAG] == registry.KEPT or tags.get(registry.SUPERSEDED_TAG) == better, tags


def test_a_worse_move_landing_after_the_better_finished_hands_the_alias_back(gate_server):
    """The loaded-machine race: the worse registration decided against the old champion, and its
    move lands only after the better one moved, read back and returned. Timing cannot see it
    (CI saw the worse left champion once); the better one's record can."""
    uri, _ = gate_server
    direct = client_of(uri)
    name, (better, worse) = model_with_champion(direct, 0.60, 0.80, 0.70)
    finished = {}
    slow = client_of(uri)
    move = slow.set_registered_model_alias

    def move_landing_late(*args):  # the worse read the old champion right before; its move is "in flight"
        if not finished:
            finished[better] = registry.apply_gate(client_of(uri), name, better, "auto", 0.80, DATASET)
        return move(*args)

    slow.set_registered_model_alias = move_landing_late
    late = registry.apply_gate(slow, name, worse, "auto", 0.70, DATASET)
    assert finished[better].promote and champion_of(direct, name) == better
    assert not late.promote and late.champion_version == better
    tags = direct.get_model_version(name, worse).tags
    assert tags[registry.DECISION_TAG] == registry.KEPT and tags[registry.SUPERSEDED_TAG] == better, tags
    assert direct.get_model_version(name, better).tags[registry.DECISION_TAG] == registry.PROMOTED


def promote_cli(uri: str, name: str, version: str, storage: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CLIENT_TIMEOUT_S)}
    return subprocess.run(
        [sys.executable, "-m", "pipelines.promote", "--model-name", name, "--version", version, "--tracking-uri", uri, "--storage", str(storage)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def test_two_gates_in_two_processes_both_past_the_comparison_leave_the_better_as_champion(gate_server, tmp_path):
    """Two processes (`pipelines.promote`) that both compared against the old champion and both move the alias.

    The better one starts first, so the worse one tends to write last: the case where the last
    writer would keep the alias. (Both start orders are covered with threads above.)
    """
    first = "better"
    uri, proxy = gate_server
    direct = client_of(uri)
    name, (better, worse) = model_with_champion(direct, 0.60, 0.80, 0.70)
    for version, accuracy in ((better, 0.80), (worse, 0.70)):
        direct.set_model_version_tag(name, version, registry.ACCURACY_TAG, f"{accuracy:.6f}")
        direct.set_model_version_tag(name, version, registry.DATASET_TAG, DATASET)
    # every alias move held 3 s: both have read the old champion (0.60) and decided to promote before either moves
    proxy.arm(Fault("POST", "/registered-models/alias", "delay", times=None, hang_s=3))
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    command = [sys.executable, "-m", "pipelines.promote", "--model-name", name, "--tracking-uri", proxy.url, "--storage", str(tmp_path)]
    order = [better, worse] if first == "better" else [worse, better]
    processes = [subprocess.Popen([*command, "--version", version], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for version in order]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    moves = [entry for entry in proxy.log if entry[2] == "delay"]
    proxy.clear()
    assert all(process.returncode == 0 for process in processes), outputs
    assert len(moves) >= 2, f"only one process moved the alias: not a race ({outputs})"
    assert champion_of(direct, name) == better, outputs
    tags = direct.get_model_version(name, worse).tags
    assert tags[registry.DECISION_TAG] == registry.KEPT or tags.get(registry.SUPERSEDED_TAG) == better, tags


def test_promote_cli_fails_closed_then_promotes_once_the_registry_answers(gate_server, tmp_path):
    uri, proxy = gate_server
    direct = client_of(uri)
    name, (candidate,) = model_with_champion(direct, 0.70, 0.80)
    # its figures were written before the registry failed (the gate's first step)
    direct.set_model_version_tag(name, candidate, registry.ACCURACY_TAG, "0.800000")
    direct.set_model_version_tag(name, candidate, registry.DATASET_TAG, DATASET)
    proxy.arm(Fault("GET", "/registered-models/get", "503", times=None))
    down = promote_cli(proxy.url, name, candidate, tmp_path)
    proxy.clear()
    assert down.returncode == 1, down.stdout + down.stderr
    error = [line for line in down.stderr.splitlines() if line.strip()][0]
    assert error.startswith("error: the gate could not check") and "not promoted" in error, down.stderr
    assert "Traceback" not in down.stdout + down.stderr
    assert champion_of(direct, name) == "1"

    # the registry answers again: the version's own figures decide
    up = promote_cli(uri, name, candidate, tmp_path)
    assert up.returncode == 0, up.stdout + up.stderr
    assert f"models:/{name}/{candidate}: promoted to @champion" in up.stdout + up.stderr
    assert champion_of(direct, name) == candidate


# --- kill -9 at each step of registration and the gate, then the same again -----------------

# where the process dies: (what, the fault that kills it when its request reaches the proxy)
KILL_POINTS = {
    "creating the version": dict(method="POST", path_part="/model-versions/create"),
    "writing the version's figures": dict(method="POST", path_part="/model-versions/set-tag"),
    "writing the gate's tags": dict(method="POST", path_part="/model-versions/set-tag", skip=3),
    "moving the alias": dict(method="POST", path_part="/registered-models/alias"),
    "reading the alias back": dict(method="GET", path_part="/registered-models/get", after="/registered-models/alias"),
}


def register_and_gate(uri: str, run_id: str, model: str, manifest: str, name: str, env: dict, proxy: FaultProxy | None = None,
                      kill_at: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tests" / "scenarios" / "register_and_gate.py"), uri, run_id, model, manifest, name, "0.9"]
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if kill_at is not None:
        proxy.arm(Fault(action="kill", kill_pid=process.pid, **kill_at))
    output, _ = process.communicate(timeout=240)
    if proxy is not None:
        proxy.clear()
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def killed_mid_registration(workdir: Path, env: dict) -> dict:
    """For each kill point: a run's registration killed there, then run again; what the registry holds after."""
    env = {**env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    model, manifest, dataset = build_in_subprocess(workdir, env, corpus_per_label=40, seed=5)
    outcomes = {}
    with MlflowServer(workdir / "mlflow", f"sqlite:///{workdir / 'mlflow.db'}", str(workdir / "artifacts")) as server:
        proxy = FaultProxy(server.uri).start()
        direct = client_of(server.uri)
        experiment = direct.create_experiment("killed-registrations")
        try:
            for point, fault in KILL_POINTS.items():
                name, _ = model_with_champion(direct, 0.50, dataset=dataset)
                run_id = direct.create_run(experiment).info.run_id
                killed = register_and_gate(proxy.url, run_id, model, manifest, name, env, proxy, fault)
                again = register_and_gate(server.uri, run_id, model, manifest, name, env)
                versions = direct.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
                outcomes[point] = {
                    "killed_exit": killed.returncode, "again_exit": again.returncode, "again_output": again.stdout[-3000:],
                    "versions": [str(v.version) for v in versions], "tags": [dict(v.tags) for v in versions],
                    "champion": champion_of(direct, name),
                }
        finally:
            proxy.stop()
    return outcomes


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.lane(killed_mid_registration, timeout_s=600, light=True)
def test_a_registration_killed_at_any_step_then_run_again_leaves_one_whole_promoted_version(request):
    outcomes = lane_result(request, killed_mid_registration)
    assert set(outcomes) == set(KILL_POINTS)
    for point, outcome in outcomes.items():
        assert outcome["killed_exit"] == -9, f"{point}: the process was not killed there ({outcome})"
        assert outcome["again_exit"] == 0, f"{point}: the rerun failed:\n{outcome['again_output']}"
        assert len(outcome["versions"]) == 1, f"{point}: the run has versions {outcome['versions']} (one expected)"
        (version,), (tags,) = outcome["versions"], outcome["tags"]
        assert tags[registry.DECISION_TAG] == registry.PROMOTED and "backend.default" in tags, f"{point}: {tags}"
        assert outcome["champion"] == version, f"{point}: @champion is v{outcome['champion']}, not the better v{version}"
