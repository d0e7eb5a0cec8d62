"""The per-worker function that Ray Train runs on every worker: the epochs, reports and fault hook.

It needs nothing from outside but its `config` dict (the same keys as TrainConfig
plus a few the driver resolves: model_path, pad_token_id, train_rows, num_threads)
and the dataset shards Ray Train hands it. Tune runs this same function.

Per epoch: train on this worker's shard of "train" in the epoch's own order
(pipelines.training.batching; DDP keeps replicas equal), evaluate on this worker's part of
"val" (counts summed over workers, so every validation row counts exactly once),
checkpoint, and report. The best epoch by validation accuracy is kept; the run
stops early after `early_stopping_patience` epochs without a better one. After the
last epoch the best epoch's model is evaluated on the test split. The step math is in
pipelines.training.loop, the checkpoint format in pipelines.training.checkpoints.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path

import torch

from pipelines.training.checkpoints import restore, save_checkpoint
from pipelines.training.loop import (
    SCORE_BINS,
    SELECTION_METRIC,
    STEP_CURVE_POINTS,
    BestEpoch,
    EpochTotals,
    batch_plan,
    build_optimizer,
    build_scheduler,
    epoch_metrics,
    evaluate,
    gather_totals,
    grad_scaler_for,
    precision_for,
    shard_steps,
    steps_per_epoch,
    train_epoch,
    unwrap,
)

PROGRESS_EVERY_S = 10.0


def maybe_inject_failure(config: dict, epoch: int) -> None:
    """Test hook: crash at the start of `fail_at_epoch`, `fail_times` times in all (default once;
    a line each in `fault_marker`), to exercise restart, resume, and a run that runs out of restarts."""
    marker = config.get("fault_marker")
    if config.get("fail_at_epoch") != epoch or not marker:
        return
    failed = Path(marker).read_text().count("\n") if os.path.exists(marker) else 0
    if failed >= config.get("fail_times", 1):
        return
    with open(marker, "a") as out:
        out.write(f"failed at epoch {epoch}\n")
    # the previous epoch's checkpoint must be registered before the crash (RAY_NOTES)
    time.sleep(2.0)
    raise RuntimeError(f"injected failure at the start of epoch {epoch} (fault test)")


class ProgressReporter:
    """Rank 0's progress: a bar on the driver's console (poster), a log line every few
    seconds, the per-step loss curve (`step_curve`, at global optimizer steps) and the
    steps-done counter that the stalled-run alert reads (`run_metrics`)."""

    def __init__(self, config: dict, epoch: int, max_steps: int, poster, run_metrics=None):
        self.config, self.epoch, self.max_steps, self.poster = config, epoch, max_steps, poster
        self.run_metrics = run_metrics
        self.key = f"epoch {epoch + 1}/{config['epochs']}"
        self.last_print = time.perf_counter()
        self.step_losses: list[float] = []
        self._seen = (0.0, 0)  # loss_sum, samples at the previous step

    def __call__(self, totals: EpochTotals) -> None:
        loss = totals.loss_sum / max(totals.samples, 1)
        rate = totals.samples / totals.elapsed_s
        self.step_losses.append((totals.loss_sum - self._seen[0]) / max(totals.samples - self._seen[1], 1))
        self._seen = (totals.loss_sum, totals.samples)
        if self.run_metrics is not None:
            self.run_metrics.step_done()
        self.poster.post(self.key, totals.optimizer_steps, self.max_steps, "steps", f"loss {loss:.4f}, {rate:.1f} samples/s, data-wait {totals.data_wait_share:.0%}")
        now = time.perf_counter()
        if now - self.last_print > PROGRESS_EVERY_S:
            self.last_print = now
            print(
                f"[train] {self.key} step {totals.optimizer_steps}/{self.max_steps} "
                f"loss {loss:.4f} {rate:.1f} samples/s data-wait {totals.data_wait_share:.0%}",
                flush=True,
            )

    def step_curve(self, steps_per_epoch: int) -> list[list[float]]:
        """[[global step, mean loss of the steps up to it]], at most STEP_CURVE_POINTS points."""
        chunk = max(1, math.ceil(len(self.step_losses) / STEP_CURVE_POINTS))
        first = self.epoch * steps_per_epoch
        return [
            [first + min(start + chunk, len(self.step_losses)), sum(self.step_losses[start:start + chunk]) / len(self.step_losses[start:start + chunk])]
            for start in range(0, len(self.step_losses), chunk)
        ]


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: resume from the last checkpoint if there is one, train, report."""
    import ray.train
    import ray.train.torch

    from pipelines.core.progress import Poster
    from pipelines.training.run_metrics import WorkerMetrics

    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, int(config.get("num_threads", 1))))
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    poster = Poster(config.get("progress_board"), context.get_world_rank())
    # ray_imdb_train_worker_active while this runs (the stalled-run and idle-GPU alerts), steps on rank 0
    run_metrics = WorkerMetrics.for_this_worker()
    try:
        _train_epochs(config, context, device, poster, run_metrics)
    finally:
        run_metrics.close()


def _train_epochs(config: dict, context, device, poster, run_metrics) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    world_size, rank = context.get_world_size(), context.get_world_rank()
    model, state, best = restore(config, rank)
    if state is not None and rank == 0:
        print(f"[train] resuming from the checkpoint of epoch {state['epoch'] + 1}", flush=True)
        poster.note(f"[training] resuming from the checkpoint of epoch {state['epoch'] + 1}")
    start_epoch, history = (state["epoch"] + 1, list(state["history"])) if state else (0, [])
    model = ray.train.torch.prepare_model(model)  # DDP: every rank starts from rank 0's weights
    # from here each rank draws its own dropout masks (one seed on every rank: the same masks on
    # every worker, less regularization); rank 0 goes on as a single worker does
    if rank > 0:
        torch.manual_seed(config["seed"] + rank)
    precision, scaler = precision_for(device), grad_scaler_for(device)
    if rank == 0:
        print(f"[train] precision: {precision} on {device}"
              + (f" (compute capability {'.'.join(map(str, torch.cuda.get_device_capability(device)))})" if device.type == "cuda" else ""), flush=True)
    optimizer = build_optimizer(model, config["lr"], config["weight_decay"])
    scheduler = build_scheduler(optimizer, config, world_size)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    plan = batch_plan(config, world_size)
    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
    patience = config.get("early_stopping_patience")
    for epoch in range(start_epoch, config["epochs"]):
        maybe_inject_failure(config, epoch)
        steps = shard_steps(shards["train"], plan, config["seed"], epoch, rank)
        progress = ProgressReporter(config, epoch, steps_per_epoch(config, world_size), poster, run_metrics) if rank == 0 else None
        totals = train_epoch(model, optimizer, scheduler, steps, config, device, world_size, progress, scaler)
        run_metrics.flush()
        metrics = {"epoch": epoch + 1, **epoch_metrics(gather_totals(totals, device), scheduler.get_last_lr()[0])}
        if progress:
            metrics["train/step_loss_curve"] = progress.step_curve(steps_per_epoch(config, world_size))
        val = evaluate(model, shards["val"], config, device, poster, f"epoch {epoch + 1} validation", config.get("val_rows", 0))
        metrics.update({f"val/{k}": v for k, v in val.items()})
        if device.type == "cuda":
            metrics["train/gpu_max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
        history.append(epoch)
        last_epoch = epoch == config["epochs"] - 1
        best.offer(epoch, val, model, keep_copy=not last_epoch)
        stop = last_epoch or best.patience_spent(epoch, patience)
        metrics["epochs_trained"] = ",".join(str(e + 1) for e in history)
        folder = save_checkpoint(model, optimizer, scheduler, epoch, history, config, best) if rank == 0 else None
        if stop:
            metrics.update(_final_metrics(model, best, epoch, config, device, stopped_early=not last_epoch, poster=poster))
        report_start = time.perf_counter()
        try:
            # rank 0 uploads the checkpoint to the run's storage (a bucket on a cluster) inside report()
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if folder else None)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        if rank == 0:
            print(f"[train] epoch {epoch + 1}: checkpoint stored in {time.perf_counter() - report_start:.2f} s", flush=True)
        if stop:
            break


def _final_metrics(model, best: BestEpoch, epoch: int, config: dict, device, stopped_early: bool, poster=None) -> dict:
    """The best epoch's model on the test split (its weights put back if later epochs moved on)."""
    import ray.train

    if best.epoch != epoch and best.weights is not None:
        unwrap(model).load_state_dict(best.weights)
    if stopped_early and ray.train.get_context().get_world_rank() == 0:
        print(f"[train] early stop after epoch {epoch + 1}: no better {SELECTION_METRIC} since epoch {best.epoch + 1}", flush=True)
        if poster:
            poster.note(f"[training] early stop after epoch {epoch + 1}: no better {SELECTION_METRIC} since epoch {best.epoch + 1}")
    test = evaluate(model, ray.train.get_dataset_shard("test"), config, device, poster, "test", config.get("test_rows", 0), score_bins=SCORE_BINS)
    return {
        **{f"test/{k}": v for k, v in test.items()},
        "best_epoch": best.epoch + 1,
        "best/val_accuracy": best.accuracy,
        "best/val_loss": best.loss,  # the registered epoch's figures: a sweep ranks its trials by them
        "best/val_f1": best.f1,
        "stopped_early": int(stopped_early),
    }
