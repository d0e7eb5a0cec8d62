"""The Ray Train callback that logs each epoch's report into the run: tracking's only ray.train import (Serve never loads it).

It is also the platform's only code in the Train controller, so it counts worker group
failures for Prometheus (`ray_imdb_train_worker_failures_total`, alert `TrainRunRestarting`):
Ray's own RESTARTING state lasts one controller loop iteration, too short to be exported.
"""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from pipelines.tracking.runs import log_step_curve, numeric_metrics

log = logging.getLogger(__name__)
_worker_failures = None  # the controller's ray_imdb_train_worker_failures_total, made at the first failure


class MlflowEpochLogger(UserCallback):
    """Ray Train callback (runs in the Train controller): each report -> MLflow metrics at step=epoch.

    Logged as each epoch ends, so the UI shows a live curve and an interrupted run
    keeps what it learned.
    """

    def __init__(self, tracking_uri: str, run_id: str, board_name: str | None = None, epochs: int | None = None):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.board_name = board_name
        self.epochs = epochs
        self._poster = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics:
            return
        rank_zero = metrics[0]
        step = int(rank_zero.get("epoch", 0))
        values = {k: v for k, v in numeric_metrics(rank_zero).items() if not k.startswith("test/") and k != "epoch"}
        try:
            client = MlflowClient(self.tracking_uri)
            for key, value in values.items():
                client.log_metric(self.run_id, key, value, step=step)
            log_step_curve(client, self.run_id, rank_zero.get("train/step_loss_curve") or [])
        except Exception as exc:  # a tracking outage must not kill training: the checkpoint holds the truth
            log.warning("could not log epoch %s metrics to MLflow at %s: %s", step, self.tracking_uri, exc)
        summary = ", ".join(
            f"{k} {rank_zero[k]:.4f}" for k in ("train/loss", "val/loss", "val/accuracy", "val/f1") if k in rank_zero
        )
        line = (
            f"[training] epoch {step}{f'/{self.epochs}' if self.epochs else ''}: {summary}, "
            f"{rank_zero.get('train/samples_per_s', 0):.1f} samples/s, data-wait {rank_zero.get('train/data_wait_fraction', 0):.0%}"
        )
        print(line, flush=True)  # the log file
        self._board().note(line)  # the console

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        """Once per failed poll of the worker group (a restart follows while max_failures allows)."""
        global _worker_failures
        from ray.util.metrics import Counter

        try:
            if _worker_failures is None:
                _worker_failures = Counter(
                    "imdb_train_worker_failures",
                    description="Worker group failures seen by the Train controller (a restart follows while max_failures allows).",
                    tag_keys=("ray_train_run_name",),  # Ray Train's own label
                )
            _worker_failures.inc(tags={"ray_train_run_name": run_context.get_run_config().name})
        except Exception as exc:  # noqa: BLE001 - a metric must not change how the controller handles the failure
            log.warning("could not count the worker group failure: %s", exc)

    def _board(self):
        if self._poster is None:
            from pipelines.core.progress import Poster

            self._poster = Poster(self.board_name)
        return self._poster
