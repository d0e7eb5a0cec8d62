"""The order a worker trains in: a new one every epoch, decided by (seed, epoch, rank).

Ray Data hands each worker its rows in the order of the shards (fixed when the
dataset was prepared). The worker takes them a window at a time and, per window:

1. permutes the rows with a generator seeded by (seed, epoch, rank), so every epoch
   has its own order, the same on a rerun and when a resumed run replays the epoch;
2. optionally sorts the permuted rows by length (ties stay in permuted order) and
   cuts them into optimizer steps, whose order is shuffled again: neighbours in a
   step have similar lengths, so padding wastes little, and the model never sees a
   short-to-long sweep;
3. cuts each step into its micro-batches.

Grouping happens per optimizer step, not per micro-batch, so `--grad-accum 2` with
micro-batches of 8 sees exactly the rows that `--batch-size 16` sees in one batch.
Every step is full except the epoch's last one; with equal shards (Ray's
`streaming_split(equal=True)`) every worker has the same steps and micro-batches,
which DDP needs. Nothing here imports Ray: a bare loop (a GPU check, a benchmark)
runs the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class BatchPlan:
    """How one worker cuts its rows: micro-batches, steps and shuffle windows."""

    micro_batch: int  # rows per forward/backward on this worker
    grad_accum: int = 1  # micro-batches per optimizer step
    shuffle_window: int = 8192  # rows mixed together (rounded down to whole steps)
    group_by_length: bool = True

    @property
    def step_rows(self) -> int:
        return self.micro_batch * self.grad_accum

    @property
    def window_rows(self) -> int:
        """The window, in whole steps: only the epoch's last step can be partial."""
        return max(1, self.shuffle_window // self.step_rows) * self.step_rows

    def steps_for(self, rows: int) -> int:
        return -(-rows // self.step_rows)


def epoch_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, rank])


def window_order(lengths: np.ndarray, step_rows: int, rng: np.random.Generator, group_by_length: bool) -> np.ndarray:
    """Indices of one window's rows in training order."""
    order = rng.permutation(len(lengths))
    if not group_by_length:
        return order
    order = order[np.argsort(lengths[order], kind="stable")]
    full = len(order) // step_rows * step_rows
    steps = [order[i : i + step_rows] for i in range(0, full, step_rows)]
    rng.shuffle(steps)
    # a partial step exists only in the epoch's last window; it stays last
    return np.concatenate([*steps, order[full:]]) if steps else order


def epoch_steps(windows: Iterable[Batch], plan: BatchPlan, seed: int, epoch: int, rank: int = 0) -> Iterator[list[Batch]]:
    """Optimizer steps, each a list of micro-batches (dicts of numpy columns).

    `windows` yields the worker's rows in arrival order, `plan.window_rows` at a time
    (the last may be shorter); each needs a "length" column when grouping by length.
    """
    rng = epoch_rng(seed, epoch, rank)
    for window in windows:
        size = len(next(iter(window.values())))
        lengths = window["length"] if plan.group_by_length else np.zeros(size)
        order = window_order(np.asarray(lengths), plan.step_rows, rng, plan.group_by_length)
        for start in range(0, size, plan.step_rows):
            step = order[start : start + plan.step_rows]
            yield [
                {name: column[step[i : i + plan.micro_batch]] for name, column in window.items()}
                for i in range(0, len(step), plan.micro_batch)
            ]
