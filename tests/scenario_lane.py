"""A second lane for the cluster scenarios: they run beside the rest of the suite, not after it.

Each scenario (tests/scenarios/*.py) is a process with a Ray cluster of its own: it needs
nothing of the pytest process but CPU. On 2 cores the rest of the suite leaves about a third
of the machine idle (waiting on Ray, servers, subprocesses), and so does a scenario: side by
side, each fills the other's gaps. So the scenarios start as soon as collection is done, one
after another, the longest first, and their tests are moved to the end of the session, where
each waits for its scenario's result and asserts on it as on a run of its own.

A scenario gets a HOME and a TMPDIR of its own: the rehearsal checks that nothing of its
cluster wrote outside its folders, and the suite beside it writes in the shared ones
(`make rehearsal`, alone on the machine, checks the shared ones).

`pytest --scenario-lane=off` (or a run of one scenario test) runs each scenario inside its
test instead, as before.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCENARIOS = REPO / "tests" / "scenarios"


def scenario_command(script: str, workdir: Path) -> list[str]:
    return [sys.executable, str(SCENARIOS / script), str(workdir)]


RUNNING: set[subprocess.Popen] = set()  # what stop() must interrupt


def run_process(command: list[str], env: dict[str, str] | None, log: Path, timeout_s: float) -> tuple[int | None, str]:
    """Run to the end: (exit code, or None when it ran out of time; its output)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        RUNNING.add(process)
        try:
            returncode = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            interrupt(process)
            returncode = None
        finally:
            RUNNING.discard(process)
    return returncode, log.read_text(errors="replace")


def interrupt(process: subprocess.Popen) -> None:
    """SIGINT first: a scenario's `finally` stops the Ray nodes and servers it started."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@dataclass
class Scenario:
    script: str
    timeout_s: float
    base: Path  # its workdir (w), HOME (h) and TMPDIR (t)
    done: threading.Event = field(default_factory=threading.Event)
    returncode: int | None = None
    output: str = ""

    def env(self) -> dict[str, str]:
        for folder in (self.base / "w", self.base / "h", self.base / "t"):
            folder.mkdir(parents=True, exist_ok=True)
        return {**os.environ, "HOME": str(self.base / "h"), "TMPDIR": str(self.base / "t")}

    def run(self) -> None:
        env = self.env()
        self.returncode, self.output = run_process(scenario_command(self.script, self.base / "w"), env, self.base / "output.log", self.timeout_s)


class ScenarioLane:
    """Runs the scenarios one after another in a thread; `wait(script)` hands back one's result."""

    def __init__(self) -> None:
        self.scenarios: dict[str, Scenario] = {}
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._run_all, name="scenario-lane", daemon=True)

    def add(self, script: str, timeout_s: float) -> None:
        if script not in self.scenarios:
            # short names: Ray's sockets live under TMPDIR, and a socket path may not exceed 107 bytes
            base = Path(tempfile.mkdtemp(prefix="lane-", dir="/tmp" if Path("/tmp").is_dir() else None))
            self.scenarios[script] = Scenario(script, timeout_s, base)

    def start(self) -> None:
        if self.scenarios:
            self._thread.start()

    def has(self, script: str) -> bool:
        return script in self.scenarios

    def wait(self, script: str) -> tuple[int | None, str]:
        scenario = self.scenarios[script]
        scenario.done.wait()
        return scenario.returncode, scenario.output

    def _run_all(self) -> None:
        for scenario in self.scenarios.values():
            if not self.stopping.is_set():
                scenario.run()
            scenario.done.set()

    def stop(self) -> None:
        """At the session's end: what still runs (the session was cut short) is stopped."""
        self.stopping.set()
        for process in list(RUNNING):
            interrupt(process)
        for scenario in self.scenarios.values():
            if scenario.returncode == 0:  # its test has read what it left; kept after a failure (the nodes' logs)
                shutil.rmtree(scenario.base, ignore_errors=True)


LANE = pytest.StashKey[ScenarioLane]()


def add_option(parser: pytest.Parser) -> None:
    parser.addoption("--scenario-lane", choices=("on", "off"), default="on",
                     help="run the cluster scenarios beside the other tests (on) or inside their own tests (off)")


class LanePlugin:
    """The pytest side: queue the selected scenario tests once collection is done, start, stop."""

    @pytest.hookimpl(trylast=True)  # after -m and -k deselected: only what will run is queued
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        marked = [item for item in items if item.get_closest_marker("scenario")]
        if config.getoption("scenario_lane") == "off" or len(items) == len(marked):
            return  # nothing but scenario tests selected: nothing to run beside them
        # the longest first: the rest of the suite then overlaps the most of it
        marked.sort(key=lambda item: -item.get_closest_marker("scenario").kwargs["timeout_s"])
        lane = ScenarioLane()
        for item in marked:
            marker = item.get_closest_marker("scenario")
            lane.add(marker.args[0], marker.kwargs["timeout_s"])
        items[:] = [item for item in items if item not in marked] + marked  # they wait: last
        config.stash[LANE] = lane

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        lane = session.config.stash.get(LANE, None)
        if lane is not None and not session.config.option.collectonly:
            lane.start()

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        lane = session.config.stash.get(LANE, None)
        if lane is not None:
            lane.stop()


def run(config: pytest.Config, script: str, workdir: Path, timeout_s: float) -> tuple[int | None, str]:
    """The scenario's (exit code, output): from the lane when it ran there, else run here and now."""
    lane = config.stash.get(LANE, None)
    if lane is not None and lane.has(script):
        return lane.wait(script)
    return run_process(scenario_command(script, workdir), None, workdir.parent / f"{workdir.name}-output.log", timeout_s)
