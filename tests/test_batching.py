"""The order a worker trains in (pipelines.training.batching), and exact gradient accumulation.

No Ray here: the step code takes plain iterators, as a bare GPU check does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.training.batching import BatchPlan, epoch_steps

pytestmark = pytest.mark.timeout(120)


def windows_of(rows: int, window: int, seed: int = 0):
    """A worker's rows as Ray hands them over: `window` rows at a time, in shard order."""
    lengths = np.random.default_rng(seed).integers(5, 200, size=rows)
    for start in range(0, rows, window):
        stop = min(start + window, rows)
        yield {"row": np.arange(start, stop), "length": lengths[start:stop], "label": np.arange(start, stop) % 2}


def order(plan: BatchPlan, rows: int, seed: int, epoch: int, rank: int = 0) -> list[int]:
    steps = epoch_steps(windows_of(rows, plan.window_rows), plan, seed, epoch, rank)
    return [int(r) for step in steps for micro in step for r in micro["row"]]


@pytest.mark.parametrize("group", [False, True])
def test_every_epoch_has_its_own_order_and_a_rerun_the_same(group: bool) -> None:
    plan = BatchPlan(micro_batch=8, shuffle_window=64, group_by_length=group)
    epoch1, epoch2 = order(plan, 300, seed=42, epoch=0), order(plan, 300, seed=42, epoch=1)
    assert sorted(epoch1) == sorted(epoch2) == list(range(300)), "every row exactly once per epoch"
    assert epoch1 != epoch2, "epochs 1 and 2 saw the same order"
    assert epoch1[:8] != epoch2[:8], "epochs 1 and 2 start with the same batch"
    assert order(plan, 300, seed=42, epoch=1) == epoch2, "a rerun (or a resumed epoch) saw another order"
    assert order(plan, 300, seed=7, epoch=0) != epoch1, "the seed does not matter"


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 400),
    micro=st.integers(1, 16),
    accum=st.integers(1, 4),
    window=st.integers(1, 200),
    group=st.booleans(),
    epoch=st.integers(0, 5),
)
def test_steps_are_full_but_the_last_and_cover_every_row(rows, micro, accum, window, group, epoch) -> None:
    """Whatever the sizes: each row once; every step full but the epoch's last; micro-batches within a step."""
    plan = BatchPlan(micro_batch=micro, grad_accum=accum, shuffle_window=window, group_by_length=group)
    steps = list(epoch_steps(windows_of(rows, plan.window_rows), plan, seed=3, epoch=epoch))
    assert len(steps) == plan.steps_for(rows)
    sizes = [sum(len(m["row"]) for m in step) for step in steps]
    assert all(size == plan.step_rows for size in sizes[:-1])
    assert all(len(m["row"]) <= micro for step in steps for m in step)
    assert sorted(int(r) for step in steps for m in step for r in m["row"]) == list(range(rows))


def test_equal_shards_give_every_worker_the_same_step_structure() -> None:
    """DDP: two workers with equal row counts step and sync on the same micro-batches."""
    plan = BatchPlan(micro_batch=4, grad_accum=3, shuffle_window=50, group_by_length=True)
    shapes = [
        [[len(m["row"]) for m in step] for step in epoch_steps(windows_of(203, plan.window_rows, seed=rank), plan, 1, 0, rank)]
        for rank in (0, 1)
    ]
    assert shapes[0] == shapes[1]


def test_grouping_by_length_cuts_padding() -> None:
    def padding_efficiency(group: bool) -> float:
        plan = BatchPlan(micro_batch=8, shuffle_window=256, group_by_length=group)
        real = padded = 0
        for step in epoch_steps(windows_of(1000, plan.window_rows), plan, 0, 0):
            for micro in step:
                real += int(micro["length"].sum())
                padded += int(micro["length"].max()) * len(micro["length"])
        return real / padded

    grouped, plain = padding_efficiency(True), padding_efficiency(False)
    assert grouped > plain + 0.2, f"grouping should cut padding ({grouped:.2f} vs {plain:.2f})"


# --------------------------------------------------------------- exact gradient accumulation

def _no_dropout_tiny_model(folder):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(folder)
    return str(folder)


def _token_windows(rows: int, window: int):
    rng = np.random.default_rng(5)
    lengths = rng.integers(4, 40, size=rows)
    ids = np.empty(rows, dtype=object)
    ids[:] = [rng.integers(1, 300, size=n).astype(np.int32) for n in lengths]
    labels = rng.integers(0, 2, size=rows)
    for start in range(0, rows, window):
        stop = min(start + window, rows)
        yield {"input_ids": ids[start:stop], "length": lengths[start:stop].astype(np.int32), "label": labels[start:stop]}


def _train_one_epoch(model_dir, batch_size: int, grad_accum: int, rows: int, epochs: int = 2):
    from pipelines.text.model import load_classifier
    from pipelines.training.loop import batch_plan, build_optimizer, build_scheduler, train_epoch

    torch.manual_seed(0)
    model = load_classifier(model_dir)
    config = {"batch_size": batch_size, "grad_accum": grad_accum, "train_rows": rows, "epochs": epochs, "lr": 1e-3,
              "weight_decay": 0.01, "warmup_ratio": 0.1, "max_grad_norm": 1.0, "pad_token_id": 0, "max_length": 64,
              "shuffle_window": 64, "group_by_length": True}
    optimizer = build_optimizer(model, config["lr"], config["weight_decay"])
    scheduler = build_scheduler(optimizer, config, world_size=1)
    plan = batch_plan(config, world_size=1)
    losses, steps = [], []
    for epoch in range(epochs):
        totals = train_epoch(model, optimizer, scheduler, epoch_steps(_token_windows(rows, plan.window_rows), plan, 1, epoch),
                             config, torch.device("cpu"))
        losses.append(totals.loss_sum / totals.samples)
        steps.append(totals.optimizer_steps)
    return model, losses, steps, scheduler


def test_grad_accum_2_of_8_matches_batch_16(tmp_path) -> None:
    """100 rows: 6 full steps of 16 and a last one of 4, which is stepped, not carried into the next epoch."""
    model_dir = _no_dropout_tiny_model(tmp_path / "tiny")
    big, big_losses, big_steps, big_scheduler = _train_one_epoch(model_dir, batch_size=16, grad_accum=1, rows=100)
    accum, accum_losses, accum_steps, accum_scheduler = _train_one_epoch(model_dir, batch_size=16, grad_accum=2, rows=100)
    assert big_steps == accum_steps == [7, 7], "the short last step of each epoch is a step of its own"
    assert accum_scheduler.last_epoch == 14 and accum_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12), \
        "the schedule must end exactly at the last real step"
    assert accum_losses == pytest.approx(big_losses, rel=1e-4)
    for (name, a), (_, b) in zip(big.named_parameters(), accum.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"{name} differs after two epochs")
