"""Progress from Ray workers to the driver's terminal: a small actor the driver polls.

Workers' stdout reaches the driver only as log lines (into the log file, see
pipelines.core.console). Their progress is posted instead to a `ProgressBoard` actor,
named per run, and a driver thread draws it as bars. Posting is fire-and-forget
and throttled, so a worker never waits on it; a run without a board (a sweep's
trials, the tests) posts nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.core import console

log = logging.getLogger(__name__)
POLL_S = 0.5
POST_EVERY_S = 1.0


@ray.remote(num_cpus=0, max_restarts=0)
class ProgressBoard:
    """Bars by key: (done per rank, total, unit, postfix); plus notes (lines) in order."""

    def __init__(self):
        self.bars: dict[str, dict] = {}
        self.notes: list[str] = []

    def post(self, key: str, rank: int, done: int, total: int, unit: str, postfix: str = "") -> None:
        entry = self.bars.setdefault(key, {"done": {}, "total": total, "unit": unit, "postfix": ""})
        entry["done"][rank] = done
        entry["total"] = total
        if postfix:
            entry["postfix"] = postfix

    def note(self, line: str) -> None:
        self.notes.append(line)

    def snapshot(self, notes_seen: int) -> tuple[dict, list[str]]:
        return self.bars, self.notes[notes_seen:]


class Poster:
    """A worker's (or the controller's) side of a board: throttled posts, final states always."""

    def __init__(self, board_name: str | None, rank: int = 0):
        self.board = ray.get_actor(board_name) if board_name else None
        self.rank = rank
        self._last: dict[str, float] = {}

    def post(self, key: str, done: int, total: int, unit: str, postfix: str = "", force: bool = False) -> None:
        if self.board is None:
            return
        now = time.monotonic()
        if not force and done < total and now - self._last.get(key, 0.0) < POST_EVERY_S:
            return
        self._last[key] = now
        self.board.post.remote(key, self.rank, done, total, unit, postfix)

    def note(self, line: str) -> None:
        if self.board is not None and self.rank == 0:
            self.board.note.remote(line)


@contextmanager
def board(run_name: str) -> Iterator[str | None]:
    """A board named for the run, drawn on the terminal while the block runs; yields its name.

    Without a console session nothing would be drawn: no board, and workers post nothing.
    """
    if not console.active():
        yield None
        return
    name = f"progress-{run_name}"
    # On the driver's node: a board on a worker node would die with that node, and with it
    # every line posted after (a restarted run's "resuming" line among them).
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ProgressBoard.options(name=name, scheduling_strategy=here).remote()
    follower = _Follower(actor)
    follower.start()
    try:
        yield name
    finally:
        follower.stop()
        ray.kill(actor, no_restart=True)


class _Follower(threading.Thread):
    """Polls the board and mirrors it as tqdm bars (one per key, in order) and lines."""

    def __init__(self, actor):
        super().__init__(name="progress-follower", daemon=True)
        self.actor = actor
        self.stopping = threading.Event()
        self.bars: dict = {}
        self.closed: set[str] = set()
        self.notes_seen = 0

    def run(self) -> None:
        while not self.stopping.wait(POLL_S):
            self._poll()
        self._poll()
        for key in list(self.bars):
            self._close(key)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)

    def _poll(self) -> None:
        try:
            bars, notes = ray.get(self.actor.snapshot.remote(self.notes_seen), timeout=10)
        except Exception as exc:  # progress is a convenience: never let it fail a run
            log.debug("progress board not readable: %s", exc)
            return
        for key, entry in bars.items():
            if key in self.closed:
                continue
            for open_key in [k for k in self.bars if k != key and _finished(bars[k])]:
                self._close(open_key)
            self._draw(key, entry)
        for line in notes:
            self._close_finished(bars)
            console.say(line)
        self.notes_seen += len(notes)

    def _draw(self, key: str, entry: dict) -> None:
        if key not in self.bars:
            if key.startswith("test"):
                console.stage("evaluation", "the test split, with the best epoch's model")
            self.bars[key] = console.bar(entry["total"], key, entry["unit"])
        self.bars[key].set_done(min(sum(entry["done"].values()), entry["total"] or 0), entry["postfix"])
        if _finished(entry):
            self._close(key)

    def _close_finished(self, bars: dict) -> None:
        for key in [k for k in self.bars if _finished(bars.get(k, {}))]:
            self._close(key)

    def _close(self, key: str) -> None:
        progress = self.bars.pop(key, None)
        if progress is not None:
            console.close_bar(progress)
            self.closed.add(key)


def _finished(entry: dict) -> bool:
    return bool(entry) and entry["total"] is not None and sum(entry["done"].values()) >= entry["total"]
