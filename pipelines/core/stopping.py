"""How a command stops on SIGINT or SIGTERM: like Ctrl-C, with nothing it started left running.

Signals. An entry point (pipelines.core.cli.run_main, `signals_handled()`) takes both: SIGINT raises
KeyboardInterrupt in the main thread, as Python's own handler does, and SIGTERM does
whatever SIGINT does at that moment (KeyboardInterrupt; or, inside `Tuner.fit` and
`TorchTrainer.fit`, their graceful Ctrl-C handlers). The exit code says which signal it
was: 130 or 143. Python keeps SIGINT ignored when it starts ignored (a background job of a
non-interactive shell), which made `kill -INT` to `python -m serve.app &` do nothing; an
entry point takes it anyway. Ray replaces the SIGTERM handler in `ray.init` (its driver
exits, its node kills the raylet and leaves the raylet's agents running) and Tune and Train
replace SIGINT's while they run without putting it back: `kept_handlers()` around those
calls puts ours back.

Processes. `ray.shutdown()` gives each process of the local node a second to exit and
then kills it; when that is the raylet, its DashboardAgent and RuntimeEnvAgent
(children of the raylet, not of the driver) are left behind, and at times they do not
exit on their own. `track_local_ray()` records the processes of the local node that
`ray.init()` started; `shutdown_ray()` notes everything below them, shuts Ray down and then
ends what of that is still running. Only processes below those are touched: never another
Ray session's (tests run several at once), never the rest of a pytest process's children.
Linux only (it reads /proc); elsewhere it is `ray.shutdown()` alone.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
LEFTOVER_GRACE_S = 3.0  # SIGTERM, then this long, then SIGKILL (Ray itself gives each process 1 s)

_installed = False
_received: list[int] = []  # the stop signals received, in order


# --- signals ----------------------------------------------------------------------------

@contextmanager
def signals_handled() -> Iterator[None]:
    """An entry point's SIGINT and SIGTERM handling for the block (main thread only; a no-op elsewhere).

    The handlers that were there before come back after it: an entry point run inside a
    test leaves the test process as it found it.
    """
    global _installed
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    _received.clear()
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    _installed = True
    try:
        yield
    finally:
        _installed = False
        for signum, handler in saved.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _first_or_third(signum: int) -> bool:
    """Record the signal; False for a second one, which lets the stop the first one began finish
    (cut short, it would leave processes behind); a third one cuts it short."""
    _received.append(signum)
    if len(_received) == 2:
        log.warning("%s while stopping: still stopping (a third signal cuts the clean-up short)", signal.Signals(signum).name)
        return False
    return True


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _first_or_third(signum):
        raise KeyboardInterrupt


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    if not _first_or_third(signum):
        return
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler) and handler not in (_on_sigint, signal.default_int_handler):
        handler(signal.SIGINT, frame)  # a library's Ctrl-C (Tune saves the sweep and stops its trials)
        return
    raise KeyboardInterrupt


@contextmanager
def kept_handlers() -> Iterator[None]:
    """Put the entry point's SIGINT and SIGTERM handlers back after the block (see the module doc).

    Outside an entry point (library use, tests) Ray's and the libraries' handlers stay.
    """
    if not _installed or threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def stop_signal() -> int:
    """The signal that stopped the command: the first one received, else SIGINT (a KeyboardInterrupt from elsewhere)."""
    return _received[0] if _received else signal.SIGINT


def exit_code() -> int:
    """128 + the signal, as a shell reports a process the signal killed: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + stop_signal()


def stop_line() -> str:
    """What a person reads when the command was stopped."""
    return "interrupted" if stop_signal() == signal.SIGINT else f"terminated ({signal.Signals(stop_signal()).name})"


# --- the processes of the local Ray ------------------------------------------------------

_ray_roots: set[tuple[int, int]] = set()  # (pid, start time) of the local Ray's processes this process started


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, start time in clock ticks, state) of every process on the machine; {} without /proc."""
    table = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return table
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat:
                # the command name may hold spaces and parentheses: the fields follow its last ')'
                fields = stat.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # it ended meanwhile
        table[int(name)] = (int(fields[1]), int(fields[19]), fields[0].decode())
    return table


def identify(pids: Iterable[int]) -> set[tuple[int, int]]:
    """(pid, start time) of those of `pids` that run: a pid names the same process only as long as it lives."""
    table = _process_table()
    return {(pid, table[pid][1]) for pid in pids if pid in table and table[pid][2] != "Z"}


def descendants(roots: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """`roots` that still run, and every process below them; a pid taken by a new process since is not followed."""
    roots = list(roots)
    if not roots:
        return set()
    table = _process_table()
    below: dict[int, list[int]] = {}
    for pid, (parent, _, _) in table.items():
        below.setdefault(parent, []).append(pid)
    found: set[tuple[int, int]] = set()
    stack = [pid for pid, start in roots if pid in table and table[pid][1] == start]
    while stack:
        pid = stack.pop()
        if pid in table and table[pid][2] != "Z":
            found.add((pid, table[pid][1]))
        stack.extend(child for child in below.get(pid, ()) if (child, table[child][1]) not in found)
    return found


def alive(processes: Iterable[tuple[int, int]]) -> set[tuple[int, int]]:
    """The ones still running (same pid and start time; a zombie has ended)."""
    table = _process_table()
    return {(pid, start) for pid, start in processes if pid in table and table[pid][1] == start and table[pid][2] != "Z"}


def end_processes(processes: Iterable[tuple[int, int]], grace_s: float = LEFTOVER_GRACE_S) -> set[tuple[int, int]]:
    """SIGTERM what still runs of `processes`, SIGKILL what outlives `grace_s`; returns the ones that were still running."""
    running = alive(processes)
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid, _ in alive(running):
            try:
                os.kill(pid, signum)
            except OSError:
                pass
        deadline = time.monotonic() + (grace_s if signum == signal.SIGTERM else 5.0)
        while alive(running) and time.monotonic() < deadline:
            _reap(running)
            time.sleep(0.1)
        if not alive(running):
            break
    _reap(running)
    return running


def _reap(processes: Iterable[tuple[int, int]]) -> None:
    """Collect the exit status of those that are this process's children (else they stay zombies until it exits)."""
    for pid, _ in processes:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass  # not our child, or already collected


def track_local_ray(pids: Iterable[int]) -> None:
    """Record the processes that `ray.init()` started for a local Ray (GCS, raylet, dashboard, monitors)."""
    _ray_roots.update(identify(pids))


def shutdown_ray() -> None:
    """`ray.shutdown()`, then end whatever the local Ray this process started left running."""
    ray: Any = sys.modules.get("ray")
    below = descendants(_ray_roots)
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    _ray_roots.clear()
    if not below:
        return
    leftovers = end_processes(below)
    if leftovers:
        log.info("ended %d process(es) the local Ray left running: pids %s", len(leftovers), sorted(pid for pid, _ in leftovers))
