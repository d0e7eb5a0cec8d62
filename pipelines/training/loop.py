"""The per-step math of training and evaluation, with no Ray in it.

`train_epoch` and `evaluate_batches` take plain iterators, not Ray objects, so a bare
loop (a GPU check, the benchmarks) times the very same step code that the Ray Train
workers run (pipelines.training.worker).
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import astuple, dataclass, fields
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from pipelines.text.tokenization import PadCollate
from pipelines.training.batching import Batch, BatchPlan, epoch_steps
from pipelines.training.metrics import metrics_from_counts

SCORE_BINS = 100  # test-set score histograms: ROC / PR curves exact at 0.01 thresholds
STEP_CURVE_POINTS = 200  # per-step train loss points kept per epoch (chunk means beyond that)
SELECTION_METRIC = "val/accuracy"


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
    # the first step carries the pipeline's start-up; steady-state rates leave it out
    first_batch_wait_s: float = 0.0
    first_batch_compute_s: float = 0.0
    first_batch_rows: int = 0

    @property
    def elapsed_s(self) -> float:
        return max(self.data_wait_s + self.compute_s, 1e-9)

    @property
    def data_wait_share(self) -> float:
        return self.data_wait_s / self.elapsed_s


def batch_plan(config: dict, world_size: int) -> BatchPlan:
    return BatchPlan(
        micro_batch=config["batch_size"] // (world_size * config["grad_accum"]),
        grad_accum=config["grad_accum"],
        shuffle_window=config.get("shuffle_window", 8192),
        group_by_length=config.get("group_by_length", False),
    )


def steps_per_epoch(config: dict, world_size: int) -> int:
    """Optimizer steps per epoch, the partial last one included: what the LR schedule spans."""
    per_worker_rows = config["train_rows"] // world_size  # streaming_split(equal=True)
    steps = batch_plan(config, world_size).steps_for(per_worker_rows)
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


def build_scheduler(optimizer: torch.optim.Optimizer, config: dict, world_size: int):
    """Linear warm-up, then linear decay to 0 over the run's real optimizer steps."""
    from transformers import get_linear_schedule_with_warmup

    total_steps = steps_per_epoch(config, world_size) * config["epochs"]
    return get_linear_schedule_with_warmup(optimizer, int(config["warmup_ratio"] * total_steps), total_steps)


def precision_for(device: torch.device) -> str:
    """bf16 where the GPU computes in it natively (compute capability >= 8.0: A100, L4, H100...),
    fp16 with a gradient scaler on older GPUs (T4, V100: `torch.cuda.is_bf16_supported()` says yes
    there too, by emulation, and slowly), fp32 on CPU (bf16 is slower there)."""
    if device.type != "cuda":
        return "fp32"
    major, _ = torch.cuda.get_device_capability(device)
    return "bf16" if major >= 8 else "fp16"


def autocast_for(device: torch.device):
    precision = precision_for(device)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler_for(device: torch.device):
    """fp16 needs its loss scaled (small gradients underflow); None for bf16 and fp32."""
    return torch.amp.GradScaler("cuda") if precision_for(device) == "fp16" else None


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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {name: tensor.pin_memory().to(device, non_blocking=True) for name, tensor in batch.items()}


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    steps: Iterable[list[Batch]],
    config: dict,
    device: torch.device,
    world_size: int = 1,
    progress: Callable[[EpochTotals], None] | None = None,
    scaler=None,
) -> EpochTotals:
    """One epoch over `steps` (lists of numpy micro-batches); returns this worker's totals.
    `scaler`: fp16's gradient scaler (grad_scaler_for), else None.

    Each micro-batch's mean loss is weighted by its share of the step's rows, so a
    step of 2 x 8 rows gives the gradient of one batch of 16, and the epoch's short
    last step is a step of its own, never carried into the next epoch.
    """
    totals = EpochTotals()
    max_steps = steps_per_epoch(config, world_size)
    collate = PadCollate(config["pad_token_id"], multiple_of=8 if device.type == "cuda" else 1)
    model.train()
    started = ready = time.perf_counter()
    for step in steps:
        fetched = time.perf_counter()
        if totals.optimizer_steps >= max_steps:
            continue  # drain, unmeasured: every worker must consume its whole shard each epoch
        totals.data_wait_s += fetched - ready
        step_rows = sum(len(micro["label"]) for micro in step)
        for index, micro in enumerate(step):
            _forward_backward(model, to_device(collate(micro), device), step_rows, index == len(step) - 1, totals, config, world_size, scaler)
        if scaler is not None:
            scaler.unscale_(optimizer)  # the clipping below works on the true gradients
        if config["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["max_grad_norm"])
        if scaler is not None:
            scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        totals.optimizer_steps += 1
        ready = time.perf_counter()
        totals.compute_s += ready - fetched
        if totals.optimizer_steps == 1:  # pipeline start-up: actors, tokenizer load, first window
            totals.first_batch_wait_s, totals.first_batch_compute_s, totals.first_batch_rows = fetched - started, ready - fetched, step_rows
        if progress:
            progress(totals)
    return totals


def _forward_backward(model, batch: dict, step_rows: int, last_in_step: bool, totals: EpochTotals, config: dict, world_size: int,
                      scaler=None) -> None:
    rows = batch["labels"].shape[0]
    # DDP all-reduces gradients on every backward; skip it until the step's last micro-batch
    sync = model.no_sync() if (world_size > 1 and not last_in_step and hasattr(model, "no_sync")) else nullcontext()
    try:
        with sync:
            with autocast_for(batch["labels"].device):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"])
            weighted = loss * (rows / step_rows)
            (scaler.scale(weighted) if scaler is not None else weighted).backward()
    except torch.cuda.OutOfMemoryError as exc:
        raise RuntimeError(_oom_message(config, world_size)) from exc
    totals.micro_batches += 1
    totals.samples += rows
    totals.loss_sum += loss.item() * rows  # .item() syncs with the GPU once per micro-batch
    totals.real_tokens += int(batch["attention_mask"].sum())
    totals.padded_tokens += batch["attention_mask"].numel()


def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    config: dict,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    score_bins: int = 0,
) -> dict:
    """Loss, accuracy, precision, recall, F1 and the confusion matrix; summed over workers.

    `score_bins` > 0 adds histograms of the positive-class probability per true label
    (`score_hist_pos`, `score_hist_neg`): they add up over workers, and ROC and
    precision-recall curves are drawn from them (pipelines.tracking.report_content).
    """
    module = unwrap(model)  # no DDP collectives inside: workers may hold different row counts
    module.eval()
    collate = PadCollate(config["pad_token_id"], multiple_of=8 if device.type == "cuda" else 1)
    # loss_sum, rows, tp, fp, fn, tn
    counts = torch.zeros(6, dtype=torch.float64, device=device)
    histograms = torch.zeros(2, max(score_bins, 1), dtype=torch.float64, device=device)  # (true neg, true pos) x bins
    with torch.inference_mode():
        for numpy_batch in batches:
            batch = to_device(collate(numpy_batch), device)
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
            if score_bins:
                positive = torch.softmax(logits.float(), dim=-1)[:, 1]
                bins = (positive * score_bins).long().clamp_(0, score_bins - 1)
                histograms.index_put_((labels.long(), bins), torch.ones_like(positive, dtype=torch.float64), accumulate=True)
            if progress:
                progress(int(counts[1]))  # rows so far (a sync per batch: cheap next to the forward pass)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts)
        if score_bins:
            dist.all_reduce(histograms)
    module.train()
    metrics = metrics_from_counts(counts.tolist())
    if score_bins:
        metrics["score_hist_neg"], metrics["score_hist_pos"] = ([int(v) for v in row] for row in histograms.tolist())
    return metrics


def gather_totals(totals: EpochTotals, device: torch.device) -> list[EpochTotals]:
    """Every worker's totals, in rank order (just this one's without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [totals]
    mine = torch.tensor(astuple(totals), dtype=torch.float64, device=device)
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    kinds = [type(getattr(totals, f.name)) for f in fields(EpochTotals)]
    return [EpochTotals(*(kind(value) for kind, value in zip(kinds, row.tolist()))) for row in everyone]


def epoch_metrics(ranks: list[EpochTotals], lr: float) -> dict:
    """The epoch over all workers: loss averaged over rows, rates summed, data wait mean and max."""
    def steady_elapsed(t: EpochTotals) -> float:
        return max(t.elapsed_s - t.first_batch_wait_s - t.first_batch_compute_s, 1e-9)

    samples = max(sum(t.samples for t in ranks), 1)
    waits = [t.data_wait_share for t in ranks]
    metrics = {
        "train/loss": sum(t.loss_sum for t in ranks) / samples,
        "train/samples_per_s": sum(t.samples / t.elapsed_s for t in ranks),
        "train/tokens_per_s": sum(t.real_tokens / t.elapsed_s for t in ranks),
        "train/data_wait_fraction": sum(waits) / len(waits),
        "train/data_wait_fraction_max": max(waits),
        "train/steady_samples_per_s": sum((t.samples - t.first_batch_rows) / steady_elapsed(t) for t in ranks),
        "train/steady_data_wait_fraction": sum((t.data_wait_s - t.first_batch_wait_s) / steady_elapsed(t) for t in ranks) / len(ranks),
        "train/startup_wait_s": max(t.first_batch_wait_s for t in ranks),
        "train/padding_efficiency": sum(t.real_tokens for t in ranks) / max(sum(t.padded_tokens for t in ranks), 1),
        "train/optimizer_steps": ranks[0].optimizer_steps,
        "train/epoch_seconds": max(t.elapsed_s for t in ranks),
        "train/lr": lr,
    }
    if len(ranks) > 1:  # a slow or starved worker shows up here, not only in the mean
        for rank, t in enumerate(ranks):
            metrics[f"train/rank{rank}/loss"] = t.loss_sum / max(t.samples, 1)
            metrics[f"train/rank{rank}/samples_per_s"] = t.samples / t.elapsed_s
            metrics[f"train/rank{rank}/data_wait_fraction"] = t.data_wait_share
    return metrics


@dataclass
class BestEpoch:
    """The best epoch so far by validation accuracy (a tie is no improvement), and its weights while later epochs train on."""

    epoch: int = -1
    accuracy: float = -math.inf
    loss: float = math.inf
    f1: float = math.nan
    weights: dict | None = None  # a CPU copy

    def offer(self, epoch: int, val: dict, model: torch.nn.Module, keep_copy: bool) -> bool:
        better = val["accuracy"] > self.accuracy
        if better:
            self.epoch, self.accuracy, self.loss, self.f1 = epoch, val["accuracy"], val["loss"], val.get("f1", math.nan)
            self.weights = {k: v.detach().to("cpu", copy=True) for k, v in unwrap(model).state_dict().items()} if keep_copy else None
        return better

    def patience_spent(self, epoch: int, patience: int | None) -> bool:
        return patience is not None and epoch - self.epoch >= patience

    def state(self) -> dict:
        return {"epoch": self.epoch, "accuracy": self.accuracy, "loss": self.loss, "f1": self.f1}


def shard_steps(shard, plan: BatchPlan, seed: int, epoch: int, rank: int) -> Iterator[list[Batch]]:
    """This worker's train shard as the epoch's optimizer steps; the next window is fetched meanwhile."""
    windows = shard.iter_batches(batch_size=plan.window_rows, batch_format="numpy", prefetch_batches=1)
    return epoch_steps(windows, plan, seed, epoch, rank)


def evaluate(model, shard, config: dict, device, poster=None, key: str = "", total: int = 0, score_bins: int = 0) -> dict:
    batches = shard.iter_batches(batch_size=config["eval_batch_size"], batch_format="numpy", prefetch_batches=2)
    progress = (lambda rows: poster.post(key, rows, total, "reviews", force=rows >= total)) if poster else None
    metrics = evaluate_batches(model, batches, config, device, progress, score_bins)
    if poster:
        poster.post(key, metrics["rows"] if total else 0, total, "reviews", force=True)  # a worker with an empty shard
    return metrics
