"""Ray Data tokenization on a real local Ray: every row arrives, tokenized and padded per batch."""

from __future__ import annotations

import pytest

from pipelines.streaming import DataResources, read_split, tokenized_splits
from pipelines.tokenization import PadCollate, TokenizerSettings

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


def test_grouping_by_length_cuts_padding(ray_session, sample_manifest, bundled_model_path):
    settings = TokenizerSettings(bundled_model_path, max_length=512, truncation="head")

    def padding_efficiency(group: bool) -> tuple[float, int]:
        datasets = tokenized_splits(
            sample_manifest, settings, splits=("train",), group_by_length_batch_size=8 if group else None
        )
        real = padded = rows = 0
        for batch in datasets["train"].iter_torch_batches(batch_size=8, collate_fn=PadCollate(0)):
            real += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
            rows += len(batch["labels"])
        return real / padded, rows

    grouped, grouped_rows = padding_efficiency(True)
    plain, plain_rows = padding_efficiency(False)
    assert grouped_rows == plain_rows == sample_manifest.splits["train"].rows, "grouping must not lose rows"
    assert grouped > plain + 0.05, f"grouping should cut padding ({grouped:.2f} vs {plain:.2f})"
