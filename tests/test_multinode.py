"""Multi-node behaviour on one machine: losing a Serve replica or the proxy; the cluster rehearsal.

The cluster rehearsal (cluster_rehearsal.py, also `make rehearsal`): `ray up` on SSH hosts that
share no disk, real S3 and PostgreSQL servers, training spread over two worker hosts, one of
them killed mid-run (training resumes from the checkpoint in S3), a sweep, Serve, Prometheus.

Each scenario is a script under tests/scenarios/ run in its own process, with a Ray of its own
(the rehearsal's cluster, or a local Ray for Serve), because a process joins one Ray cluster
only and this one holds the session-wide Ray of the other tests. A scenario prints one
`SCENARIO_RESULT {json}` line; the assertions are here. In a whole-suite run the scenarios run
in a lane of their own, beside the other tests (tests/lane.py), and these tests come last and
read their results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import lane
from tests.lane import lane_result

SCENARIOS = Path(__file__).resolve().parent / "scenarios"
RESULT_PREFIX = "SCENARIO_RESULT "
SERVE_KILL_TIMEOUT_S = 480  # about 2 minutes on 2 busy cores: register, deploy, load, kill a replica and the proxy, recover
REHEARSAL_TIMEOUT_S = 1200  # 5 minutes alone on 2 cores, 8 beside the rest of the suite

pytestmark = [pytest.mark.slow]


def run_scenario(script: str, workdir, env: dict, timeout_s: float) -> tuple[dict, str]:
    """Run a scenario to its end; (its result, its output)."""
    returncode, output = lane.run_process([sys.executable, str(SCENARIOS / script), str(workdir)], env, workdir / "scenario-output.log", timeout_s)
    ran = "timed out" if returncode is None else f"exit {returncode}"
    lines = [line for line in output.splitlines() if line.startswith(RESULT_PREFIX)]
    assert returncode == 0 and lines, f"{script} failed ({ran}):\n{output[-6000:]}"
    return json.loads(lines[-1][len(RESULT_PREFIX) :]), output


def serve_replica_kill(workdir, env):
    return run_scenario("serve_replica_kill.py", workdir, env, SERVE_KILL_TIMEOUT_S)


def cluster_rehearsal(workdir, env):
    return run_scenario("cluster_rehearsal.py", workdir, env, REHEARSAL_TIMEOUT_S)


@pytest.mark.timeout(SERVE_KILL_TIMEOUT_S + 120)
@pytest.mark.lane(serve_replica_kill, timeout_s=SERVE_KILL_TIMEOUT_S)
def test_killing_a_serve_replica_or_the_proxy_under_load_loses_only_what_the_proxy_held(request):
    result, _ = lane_result(request, serve_replica_kill)
    assert result["retries"] == 0 and result["clients"] == 8, "8 plain clients, no retries of their own"
    assert result["warmup_requests"] > 0

    # 1. a replica (HTTP ingress + model; there is no other ingress) gets kill -9: the proxy
    # sends what it was running to the other replica, so not one request may fail ...
    replica = result["replica_kill"]
    assert replica["failed_requests"] == 0, f"{replica['failed_requests']} of {replica['requests']} failed: {replica['failed_examples']}"
    # ... and the kill did catch requests in flight (every client had one out, and the scenario
    # keeps each replica holding some), so the re-send ran: at most one request per client
    assert replica["in_flight_at_kill"] == replica["clients"], replica
    assert 1 <= replica["resent_by_proxy"] <= replica["clients"], replica
    assert replica["requests_during_recovery"] > 0 and replica["requests_after_recovery"] > 0
    assert replica["killed"] in replica["replicas_before"] and replica["killed"] not in replica["replicas_after"]
    assert len(replica["replicas_after"]) == 2, "Serve replaced the killed replica"

    # 2. Serve's HTTP proxy gets kill -9: the requests on its connections die with it (at most
    # one per client), and until the controller starts a new proxy the port refuses
    # connections; nothing else fails, and the new proxy serves every request after it
    proxy = result["proxy_kill"]
    assert proxy["failed_in_flight"] <= proxy["clients"], proxy
    refused = {kind for kind in proxy["error_kinds"] if kind not in ("RemoteProtocolError", "ReadError")}
    assert refused <= {"ConnectError"}, f"failures other than the dead proxy's connections: {proxy['error_kinds']} {proxy['failed_examples']}"
    assert proxy["recovery_s"] < 30, "a dead proxy is replaced in seconds (RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S)"
    assert proxy["requests_after_recovery"] > 0 and proxy["failed_after_recovery"] == 0, proxy
    # the new proxy's 404 before it has the route table is held by serve/proxy_retry.py: never seen
    assert proxy["no_route_404"] == 0, proxy
    print("replica kill:", {k: replica[k] for k in ("requests", "failed_requests", "resent_by_proxy", "recovery_s", "max_latency_s")},
          "proxy kill:", {k: proxy[k] for k in ("requests", "failed_requests", "failed_in_flight", "failed_after_kill", "recovery_s")},
          "timings:", result["timings"])


@pytest.mark.rehearsal  # its own CI step after `make test` (make test-rehearsal)
@pytest.mark.timeout(REHEARSAL_TIMEOUT_S + 120)
@pytest.mark.lane(cluster_rehearsal, timeout_s=REHEARSAL_TIMEOUT_S)
def test_cluster_rehearsal_ray_up_on_ssh_hosts_that_share_only_s3_and_mlflow(request):
    """make rehearsal: `ray up platform/cluster/onprem.yaml` on three SSH hosts (network namespaces),
    S3 + PostgreSQL + the MLflow server, a worker host killed mid-run, Prometheus and its alerts, `ray down`."""
    result, output = lane_result(request, cluster_rehearsal)

    failed = [c["what"] for c in result["checks"] if not c["ok"]]
    assert not failed and "error" not in result, f"failed checks: {failed}\n{result.get('error', '')}"
    # every step ran and was checked, in this order: none skipped by an early error
    assert len(result["checks"]) == 25, [c["what"] for c in result["checks"]]
    assert result["stray_files"] == []
    assert sorted(result["checkpoint_store_s"]) == ["1", "2", "3"], "a checkpoint per epoch (1 before the kill, 2 and 3 after the restart), timed"
    assert result["alert_fired_after_kill_s"] is not None, "TrainRunRestarting did not fire after the worker host was killed"
    assert result["metrics_missing"] == [] and len(result["metrics_checked"]) > 20
    assert all(not left for left in result["left_after_down"].values()), result["left_after_down"]
    assert "PASSED: 25/25 checks" in output
    print("timings:", result["timings"], "checkpoint store s:", result["checkpoint_store_s"],
          "alert fired after the kill (s):", result["alert_fired_after_kill_s"])
