"""The per-worker training loop that Ray Train runs on every worker.

It needs nothing from outside but its `config` dict (the same keys as TrainConfig
plus a few the driver resolves: model_path, pad_token_id, train_rows) and the
dataset shards Ray Train hands it. Tune runs this same function.

Per epoch: train on this worker's shard of "train" (DDP keeps replicas equal),
evaluate on this worker's part of "val" (counts summed over workers, so every
validation row counts exactly once), checkpoint, and report. After the last epoch
the test split is evaluated the same way and reported with the last epoch.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from pipelines.model import load_classifier
from pipelines.tokenization import PadCollate

TRAINING_STATE = "training_state.pt"
PROGRESS_EVERY_S = 10.0


@dataclass
class EpochTotals:
    """What one worker measured during one training epoch."""

    loss_sum: float = 0.0
    samples: int = 0
    micro_batches: int = 0
    optimizer_steps: int = 0
    real_tokens: int = 0
    padded_tokens: int = 0
    data_wait_s: float = 0.0
    compute_s: float = 0.0
    # the first batch carries the pipeline's start-up; steady-state rates leave it out
    first_batch_wait_s: float = 0.0
    first_batch_compute_s: float = 0.0
    first_batch_rows: int = 0


def steps_per_epoch(config: dict, world_size: int) -> int:
    """Optimizer steps per epoch: what the learning-rate schedule is laid out over."""
    per_worker_rows = config["train_rows"] // world_size  # streaming_split(equal=True)
    micro_batch = config["batch_size"] // (world_size * config["grad_accum"])
    steps = math.ceil(math.ceil(per_worker_rows / micro_batch) / config["grad_accum"])
    if config.get("max_steps_per_epoch"):
        steps = min(steps, config["max_steps_per_epoch"])
    return max(1, steps)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no decay on biases and LayerNorm weights (they are not overfitting knobs)."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim < 2 or "LayerNorm" in name else decay).append(parameter)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.cuda.is_available()  # one kernel per step instead of one per tensor
    return torch.optim.AdamW(groups, lr=lr, fused=fused)


def autocast_for(device: torch.device):
    """bf16 autocast on GPUs that support it; full precision on CPU (bf16 is slower there)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _oom_message(config: dict, world_size: int) -> str:
    per_worker = config["batch_size"] // (world_size * config["grad_accum"])
    return (
        f"out of memory with {per_worker} reviews per worker per micro-batch "
        f"(--batch-size {config['batch_size']}, --grad-accum {config['grad_accum']}) and "
        f"--max-length {config['max_length']}: lower --max-length, or raise --grad-accum to keep the "
        "global batch with smaller micro-batches"
    )


def train_one_epoch(model, optimizer, scheduler, shard, config: dict, device, world_size: int, epoch: int) -> EpochTotals:
    totals = EpochTotals()
    accum = config["grad_accum"]
    micro_batch = config["batch_size"] // (world_size * accum)
    max_steps = steps_per_epoch(config, world_size)
    collate = PadCollate(config["pad_token_id"], multiple_of=8 if device.type == "cuda" else 1)
    is_rank_zero = ray.train.get_context().get_world_rank() == 0
    last_print = time.perf_counter()
    model.train()
    batches = shard.iter_torch_batches(batch_size=micro_batch, collate_fn=collate, prefetch_batches=config.get("prefetch_batches", 2))
    ready = time.perf_counter()
    for batch in batches:
        if totals.optimizer_steps >= max_steps:
            continue  # drain, unmeasured: every worker must consume its whole shard each epoch
        fetched = time.perf_counter()
        totals.data_wait_s += fetched - ready
        if totals.micro_batches == 0:
            totals.first_batch_wait_s = fetched - ready  # pipeline start-up: actors, tokenizer load
        boundary = (totals.micro_batches + 1) % accum == 0
        # DDP all-reduces gradients on every backward; skip it until the last micro-batch
        sync = model.no_sync() if (world_size > 1 and not boundary and hasattr(model, "no_sync")) else nullcontext()
        try:
            with sync:
                with autocast_for(device):
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
                (loss / accum).backward()
        except torch.cuda.OutOfMemoryError as exc:
            raise RuntimeError(_oom_message(config, world_size)) from exc
        totals.micro_batches += 1
        if boundary:
            if config["max_grad_norm"] > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            totals.optimizer_steps += 1
        rows = batch["labels"].shape[0]
        totals.samples += rows
        totals.loss_sum += loss.item() * rows  # .item() syncs with the GPU once per micro-batch
        totals.real_tokens += int(batch["attention_mask"].sum())
        totals.padded_tokens += batch["attention_mask"].numel()
        ready = time.perf_counter()
        totals.compute_s += ready - fetched
        if totals.micro_batches == 1:
            totals.first_batch_compute_s, totals.first_batch_rows = ready - fetched, rows
        if is_rank_zero and ready - last_print > PROGRESS_EVERY_S:
            last_print = ready
            print(
                f"[train] epoch {epoch + 1}/{config['epochs']} step {totals.optimizer_steps}/{max_steps} "
                f"loss {totals.loss_sum / max(totals.samples, 1):.4f} "
                f"{totals.samples / max(totals.data_wait_s + totals.compute_s, 1e-9):.1f} samples/s "
                f"data-wait {totals.data_wait_s / max(totals.data_wait_s + totals.compute_s, 1e-9):.0%}",
                flush=True,
            )
    return totals


def evaluate(model, shard, config: dict, device) -> dict:
    """Loss, accuracy, precision, recall, F1 and the confusion matrix over every worker's part."""
    module = unwrap(model)  # no DDP collectives inside: workers may hold different row counts
    module.eval()
    collate = PadCollate(config["pad_token_id"], multiple_of=8 if device.type == "cuda" else 1)
    # loss_sum, rows, tp, fp, fn, tn
    counts = torch.zeros(6, dtype=torch.float64, device=device)
    with torch.inference_mode():
        for batch in shard.iter_torch_batches(batch_size=config["eval_batch_size"], collate_fn=collate, prefetch_batches=2):
            with autocast_for(device):
                logits = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"]
            predictions = logits.argmax(dim=-1)
            counts[0] += torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
            counts[1] += labels.numel()
            counts[2] += ((predictions == 1) & (labels == 1)).sum()
            counts[3] += ((predictions == 1) & (labels == 0)).sum()
            counts[4] += ((predictions == 0) & (labels == 1)).sum()
            counts[5] += ((predictions == 0) & (labels == 0)).sum()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
    module.train()
    return metrics_from_counts(counts.tolist())


def metrics_from_counts(counts: list[float]) -> dict:
    loss_sum, rows, tp, fp, fn, tn = counts
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "loss": loss_sum / rows if rows else float("nan"),
        "accuracy": (tp + tn) / rows if rows else float("nan"),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "rows": int(rows),
        "tp": int(tp),
        "fp": int(fp),
        "fn": int(fn),
        "tn": int(tn),
    }


def epoch_metrics(totals: EpochTotals, world_size: int, lr: float) -> dict:
    elapsed = max(totals.data_wait_s + totals.compute_s, 1e-9)
    steady_elapsed = max(elapsed - totals.first_batch_wait_s - totals.first_batch_compute_s, 1e-9)
    steady_samples = totals.samples - totals.first_batch_rows
    return {
        "train/loss": totals.loss_sum / max(totals.samples, 1),
        # rank 0's own rate times the workers: shards are equal, steps are in lockstep
        "train/samples_per_s": totals.samples * world_size / elapsed,
        "train/tokens_per_s": totals.real_tokens * world_size / elapsed,
        "train/data_wait_fraction": totals.data_wait_s / elapsed,
        "train/steady_samples_per_s": steady_samples * world_size / steady_elapsed,
        "train/steady_data_wait_fraction": (totals.data_wait_s - totals.first_batch_wait_s) / steady_elapsed,
        "train/startup_wait_s": totals.first_batch_wait_s,
        "train/padding_efficiency": totals.real_tokens / max(totals.padded_tokens, 1),
        "train/optimizer_steps": totals.optimizer_steps,
        "train/epoch_seconds": elapsed,
        "train/lr": lr,
    }


def save_checkpoint(model, optimizer, scheduler, epoch: int, history: list[int], config: dict) -> Path:
    """Model in Hugging Face format (loadable as is) + everything needed to resume."""
    folder = Path(tempfile.mkdtemp(prefix="ckpt-"))
    unwrap(model).save_pretrained(folder, safe_serialization=True)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "history": history,
            "config": {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool, type(None)))},
        },
        folder / TRAINING_STATE,
    )
    return folder


def maybe_inject_failure(config: dict, epoch: int) -> None:
    """Test hook: crash once at the start of `fail_at_epoch`, to exercise restart + resume."""
    marker = config.get("fault_marker")
    if config.get("fail_at_epoch") != epoch or not marker or os.path.exists(marker):
        return
    Path(marker).write_text(f"failed at epoch {epoch}\n")
    # the previous epoch's checkpoint must be registered before the crash (RAY_NOTES)
    time.sleep(2.0)
    raise RuntimeError(f"injected failure at the start of epoch {epoch} (fault test)")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point: resume from the last checkpoint if there is one, train, report."""
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, int(config.get("num_threads", 1))))
    context = ray.train.get_context()
    world_size, rank = context.get_world_size(), context.get_world_rank()
    device = ray.train.torch.get_device()

    start_epoch, history, state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            model = load_classifier(folder)
            state = torch.load(Path(folder) / TRAINING_STATE, map_location="cpu", weights_only=False)
        start_epoch, history = state["epoch"] + 1, list(state["history"])
        if rank == 0:
            print(f"[train] resuming from the checkpoint of epoch {state['epoch'] + 1}", flush=True)
    else:
        model = load_classifier(config["model_path"])
    model = ray.train.torch.prepare_model(model)

    optimizer = build_optimizer(model, config["lr"], config["weight_decay"])
    total_steps = steps_per_epoch(config, world_size) * config["epochs"]
    from transformers import get_linear_schedule_with_warmup

    scheduler = get_linear_schedule_with_warmup(optimizer, int(config["warmup_ratio"] * total_steps), total_steps)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    shards = {name: ray.train.get_dataset_shard(name) for name in ("train", "val")}
    for epoch in range(start_epoch, config["epochs"]):
        maybe_inject_failure(config, epoch)
        totals = train_one_epoch(model, optimizer, scheduler, shards["train"], config, device, world_size, epoch)
        metrics = {"epoch": epoch + 1, **epoch_metrics(totals, world_size, scheduler.get_last_lr()[0])}
        metrics.update({f"val/{k}": v for k, v in evaluate(model, shards["val"], config, device).items()})
        if device.type == "cuda":
            metrics["train/gpu_max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1024**3
        history.append(epoch)
        if epoch == config["epochs"] - 1:
            test = evaluate(model, ray.train.get_dataset_shard("test"), config, device)
            metrics.update({f"test/{k}": v for k, v in test.items()})
        metrics["epochs_trained"] = ",".join(str(e + 1) for e in history)
        folder = save_checkpoint(model, optimizer, scheduler, epoch, history, config) if rank == 0 else None
        report_start = time.perf_counter()
        try:
            # rank 0 uploads the checkpoint to the run's storage (a bucket on a cluster) inside report()
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if folder else None)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)
        if rank == 0:
            print(f"[train] epoch {epoch + 1}: checkpoint stored in {time.perf_counter() - report_start:.2f} s", flush=True)
