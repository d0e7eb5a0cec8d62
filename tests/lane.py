"""A second lane: the tests that run whole commands in processes of their own run beside the rest.

Some tests need nothing of the pytest process but CPU: a cluster scenario (tests/scenarios/*.py,
a Ray cluster of its own) or a user's command (`python -m pipelines.train_imdb` with its own
local Ray). On 2 cores the rest of the suite leaves about a third of the machine idle (waiting
on Ray, servers, subprocesses), and so does each of these: side by side, each fills the other's
gaps. So these jobs start as soon as collection is done, one after another, the longest first,
and their tests are moved to the end of the session, where each waits for its job's result and
asserts on it as on a run of its own.

A job that mostly waits (on a client's retries, a metrics export, a short command) says
`light=True`: the light jobs run one after another in a second thread, beside the heavy ones.

A test joins the lane with `@pytest.mark.lane(job, timeout_s=...)`, where `job(workdir, env)`
is a module-level function that runs the command(s) and returns what the test asserts on; the
test gets it from `lane_result(request, job)`. A job runs in a thread of the pytest process:
it runs its commands as subprocesses and touches no process-wide state (torch's seed, the
environment, the working folder). A job gets a HOME and a TMPDIR of its own: the
rehearsal checks that nothing of its cluster wrote outside its folders, and the suite beside it
writes in the shared ones (`make rehearsal`, alone on the machine, checks the shared ones).

`pytest --lane=off`, or a run of nothing but lane tests, runs each job inside its test instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNNING: set[subprocess.Popen] = set()  # what the session's end must interrupt

JobFunction = Callable[[Path, dict], Any]
RAN_HERE = pytest.StashKey[dict]()


def run_process(command: list[str], env: dict[str, str] | None, log: Path, timeout_s: float, cwd: Path = REPO) -> tuple[int | None, str]:
    """Run to the end: (exit code, or None when it ran out of time; stdout and stderr together)."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        RUNNING.add(process)
        # a blocking wait and a timer, not wait(timeout=): that polls with time.sleep, which a
        # test in the main thread may have patched (and then this thread spins through its fake)
        timed_out = threading.Event()
        timer = threading.Timer(timeout_s, lambda: (timed_out.set(), interrupt(process)))
        timer.start()
        try:
            returncode = process.wait()
        finally:
            timer.cancel()
            RUNNING.discard(process)
    return (None if timed_out.is_set() else returncode), log.read_text(errors="replace")


def interrupt(process: subprocess.Popen) -> None:
    """SIGINT first: a scenario's `finally` stops the Ray nodes and servers it started."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    killer = threading.Timer(90, process.kill)  # then SIGKILL: as above, no wait(timeout=)
    killer.start()
    try:
        process.wait()
    finally:
        killer.cancel()


@dataclass
class Job:
    function: JobFunction
    timeout_s: float
    light: bool = False  # mostly waits (retries, timers, a short command): runs in the light slot, beside the heavy jobs
    # short names: Ray's sockets live under TMPDIR, and a socket path may not exceed 107 bytes
    base: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lane-", dir="/tmp" if Path("/tmp").is_dir() else None)))
    done: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None
    started_s: float | None = None  # seconds into the lane
    wall_s: float | None = None

    @property
    def name(self) -> str:
        return f"{self.function.__module__.rsplit('.', 1)[-1]}.{self.function.__name__}"

    def run(self, lane_start: float) -> None:
        workdir, home, tmp = self.base / "w", self.base / "h", self.base / "t"
        for folder in (workdir, home, tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.started_s = time.monotonic() - lane_start
        try:
            self.value = self.function(workdir, {**os.environ, "HOME": str(home), "TMPDIR": str(tmp)})
        except BaseException as error:  # noqa: BLE001 - handed to the test, which raises it
            self.error = error
        self.wall_s = time.monotonic() - lane_start - self.started_s


class Lane:
    """Runs the jobs one after another in a thread, the light ones in a second; `wait(function)` hands back one's result."""

    def __init__(self) -> None:
        self.jobs: dict[JobFunction, Job] = {}
        self.stopping = threading.Event()
        self.started = time.monotonic()
        self._threads = [threading.Thread(target=self._run_all, args=(light,), name=f"test-lane-{'light' if light else 'heavy'}", daemon=True)
                         for light in (False, True)]

    def add(self, function: JobFunction, timeout_s: float, light: bool = False) -> None:
        if function not in self.jobs:
            self.jobs[function] = Job(function, timeout_s, light)

    def start(self) -> None:
        if self.jobs:
            self.started = time.monotonic()
            for thread in self._threads:
                thread.start()

    def has(self, function: JobFunction) -> bool:
        return function in self.jobs

    def wait(self, function: JobFunction) -> Any:
        job = self.jobs[function]
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.value

    def _run_all(self, light: bool) -> None:
        for job in self.jobs.values():
            if job.light != light:
                continue
            if not self.stopping.is_set():
                job.run(self.started)
            job.done.set()

    def stop(self) -> None:
        """At the session's end: what still runs (the session was cut short) is stopped."""
        self.stopping.set()
        for process in list(RUNNING):
            interrupt(process)
        for job in self.jobs.values():
            if job.done.is_set() and job.error is None:  # its test has read what it left; kept after a failure
                shutil.rmtree(job.base, ignore_errors=True)

    def summary(self) -> list[str]:
        lines = [f"{job.name}{' (light)' if job.light else ''}: started at {job.started_s:.0f} s, ran {job.wall_s:.0f} s{' (failed)' if job.error else ''}"
                 for job in self.jobs.values() if job.wall_s is not None]
        ended = max((job.started_s + job.wall_s for job in self.jobs.values() if job.wall_s is not None), default=0)
        return [*lines, f"the lane ended {ended:.0f} s after it started"]


LANE = pytest.StashKey[Lane]()


def add_option(parser: pytest.Parser) -> None:
    parser.addoption("--lane", choices=("on", "off"), default="on",
                     help="run the tests marked `lane` beside the others (on) or each inside its own test (off)")


class LanePlugin:
    """The pytest side: queue the selected lane tests once collection is done, start, report, stop."""

    @pytest.hookimpl(trylast=True)  # after -m and -k deselected: only what will run is queued
    def pytest_collection_modifyitems(self, config: pytest.Config, items: list[pytest.Item]) -> None:
        marked = [item for item in items if item.get_closest_marker("lane")]
        if config.getoption("lane") == "off" or len(items) == len(marked):
            return  # nothing but lane tests selected: nothing to run beside them
        marked.sort(key=lambda item: -item.get_closest_marker("lane").kwargs["timeout_s"])  # the longest first
        lane = Lane()
        for item in marked:
            marker = item.get_closest_marker("lane")
            lane.add(marker.args[0], marker.kwargs["timeout_s"], marker.kwargs.get("light", False))
        # a test may wait for every job queued before its own: their timeouts bound it
        waiting = sum(job.timeout_s for job in lane.jobs.values()) + 120 * len(lane.jobs)
        for item in marked:
            item.add_marker(pytest.mark.timeout(waiting), append=False)
        items[:] = [item for item in items if item not in marked] + marked
        config.stash[LANE] = lane

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        lane = session.config.stash.get(LANE, None)
        if lane is not None and not session.config.option.collectonly:
            lane.start()

    def pytest_terminal_summary(self, terminalreporter, config: pytest.Config) -> None:
        lane = config.stash.get(LANE, None)
        if lane is not None and lane.jobs:
            terminalreporter.section("the lane beside the suite (tests/lane.py)")
            for line in lane.summary():
                terminalreporter.write_line(line)

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        lane = session.config.stash.get(LANE, None)
        if lane is not None:
            lane.stop()


def lane_result(request: pytest.FixtureRequest, function: JobFunction) -> Any:
    """The job's result: from the lane when it ran there, else run here and now (in the shared HOME and TMPDIR)."""
    lane = request.config.stash.get(LANE, None)
    if lane is not None and lane.has(function):
        return lane.wait(function)
    ran_here = request.config.stash.setdefault(RAN_HERE, {})  # a job shared by parametrized tests runs once
    if function not in ran_here:
        ran_here[function] = function(request.getfixturevalue("tmp_path"), dict(os.environ))
    return ran_here[function]
