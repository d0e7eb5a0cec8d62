"""Ray Data tokenization on a real local Ray: every row arrives, tokenized and padded per batch."""

from __future__ import annotations

import pytest

from pipelines.data.reading import DataResources, read_split
from pipelines.text.tokenization import PadCollate, TokenizerSettings
from pipelines.training.feed import tokenized_splits

pytestmark = pytest.mark.timeout(300)  # a resource deadlock fails here instead of hanging CI


def test_read_split_streams_every_row_of_the_manifest(ray_session, sample_manifest):
    dataset = read_split(sample_manifest, "val")
    rows = dataset.take_all()
    assert len(rows) == sample_manifest.splits["val"].rows
    assert {row["label"] for row in rows} == {0, 1}
    assert sum(row["label"] for row in rows) == sample_manifest.splits["val"].labels["1"]


def test_tokenized_batches_are_padded_to_their_own_longest_row(ray_session, sample_manifest, bundled_model_path):
    settings = TokenizerSettings(bundled_model_path, max_length=64, truncation="head_tail")
    datasets = tokenized_splits(sample_manifest, settings, splits=("train",), resources=DataResources())
    collate = PadCollate(pad_token_id=0)
    seen = 0
    widths = set()
    for batch in datasets["train"].iter_torch_batches(batch_size=16, collate_fn=collate):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[1] <= 64
        assert mask.sum(dim=1).max() == ids.shape[1], "a batch is as wide as its longest row, no wider"
        assert (ids[:, 0] == 101).all(), "every row starts with [CLS]"
        widths.add(ids.shape[1])
        seen += len(batch["labels"])
    assert seen == sample_manifest.splits["train"].rows
    assert len(widths) > 1 or widths == {64}


def test_training_rows_arrive_in_shard_order_on_every_pass(ray_session, sample_manifest, bundled_model_path):
    """--deterministic-data: the train shard a worker sees is the manifest's order, epoch after epoch.

    That is what makes a rerun (or the same trial in two sweeps) see the same batches.
    """
    import numpy as np

    from pipelines.data.datasets import read_split_table
    from pipelines.training.feed import EvalSplitDataConfig, training_datasets
    from pipelines.training.settings import TrainConfig

    config = TrainConfig(data=sample_manifest.root.uri, batch_size=16, max_length=32, group_by_length=False)
    # small tokenizer batches and two tasks: without preserve_order, blocks finish out of order
    resources = DataResources(tokenize_batch_size=32, tokenize_tasks_max=2)
    datasets = training_datasets(sample_manifest, bundled_model_path, config, resources, cache=False)

    def random_delay(batch):  # defined here: pickled by value, workers cannot import test modules
        import random
        import time

        time.sleep(random.uniform(0.0, 0.1))
        return batch

    # batches that take random times to process, as on a busy cluster: they finish out of order
    datasets["train"] = datasets["train"].map_batches(random_delay, batch_size=16, num_cpus=0.1, batch_format="numpy")
    expected = read_split_table(sample_manifest, "train").column("label").to_numpy()

    shard = EvalSplitDataConfig(preserve_order=True).configure(datasets, world_size=1, worker_handles=None, worker_node_ids=[None])[0]["train"]
    for _ in range(2):
        labels = np.concatenate([batch["label"] for batch in shard.iter_batches(batch_size=64, batch_format="numpy")])
        assert np.array_equal(labels, expected), "the train rows came out of shard order"
