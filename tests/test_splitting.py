"""Tests for pipelines.data.splitting (hash-decided, stratified splits) and validation.check_splits."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipelines.core.errors import DataError
from pipelines.data.corpus import RawSplit
from pipelines.data.splitting import hash_order, stratified_split
from pipelines.data.validation import check_splits, label_counts

pytestmark = pytest.mark.timeout(60)


def make_split(n_neg: int, n_pos: int, order: str = "grouped", seed: int = 0) -> RawSplit:
    rows = [(f"negative review {i} about film {i * 7}", 0, f"neg/{i}") for i in range(n_neg)]
    rows += [(f"positive review {i} about film {i * 11}", 1, f"pos/{i}") for i in range(n_pos)]
    if order == "shuffled":
        random.Random(seed).shuffle(rows)
    split = RawSplit()
    for text, label, origin in rows:
        split.add(text, label, origin)
    return split


def rows_of(split: RawSplit) -> list[tuple[str, int, str]]:
    return list(zip(split.texts, split.labels, split.origins))


def test_same_rows_in_another_order_give_the_same_split() -> None:
    grouped = make_split(150, 90)
    rest_a, val_a = stratified_split(grouped, 0.2)
    for seed in (1, 2, 3):
        rest_b, val_b = stratified_split(make_split(150, 90, order="shuffled", seed=seed), 0.2)
        assert set(val_b.texts) == set(val_a.texts)
        assert set(rest_b.texts) == set(rest_a.texts)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.25, 0.33, 0.5])
@pytest.mark.parametrize(("n_neg", "n_pos"), [(150, 90), (37, 41), (5, 200)])
def test_split_is_stratified_disjoint_and_complete(fraction: float, n_neg: int, n_pos: int) -> None:
    split = make_split(n_neg, n_pos, order="shuffled")
    rest, carved = stratified_split(split, fraction)
    counts = Counter(carved.labels)
    assert counts[0] == round(n_neg * fraction)
    assert counts[1] == round(n_pos * fraction)
    assert Counter(rest.labels) == {0: n_neg - counts[0], 1: n_pos - counts[1]}
    # disjoint and complete, and every row keeps its own label and origin
    assert not set(rest.texts) & set(carved.texts)
    assert sorted(rows_of(rest) + rows_of(carved)) == sorted(rows_of(split))


def test_salt_decides_which_rows_are_carved() -> None:
    split = make_split(200, 200)
    _, val = stratified_split(split, 0.25, salt="val")
    _, test = stratified_split(split, 0.25, salt="test")
    assert set(val.texts) != set(test.texts)
    assert len(val) == len(test) == 100


def test_carved_rows_are_chosen_by_hash_not_by_position() -> None:
    split = make_split(100, 100)
    _, carved = stratified_split(split, 0.1)
    carved_neg = {t for t, lab in zip(carved.texts, carved.labels) if lab == 0}
    assert len(carved_neg) == 10
    assert carved_neg != set(split.texts[:10])
    assert carved_neg != set(split.texts[90:100])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_fraction_out_of_range_is_refused(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(make_split(10, 10), fraction)


def test_hash_order_mixes_labels_and_is_a_permutation() -> None:
    split = make_split(100, 100)  # all 0s, then all 1s, as the source lists them
    ordered = hash_order(split)
    assert sorted(rows_of(ordered)) == sorted(rows_of(split))
    assert ordered.labels != sorted(ordered.labels)
    first_half = Counter(ordered.labels[:100])
    assert 30 <= first_half[0] <= 70, first_half
    # no long runs of one label either
    longest, run = 1, 1
    for a, b in zip(ordered.labels, ordered.labels[1:]):
        run = run + 1 if a == b else 1
        longest = max(longest, run)
    assert longest < 15


def test_hash_order_does_not_depend_on_input_order() -> None:
    a = hash_order(make_split(60, 40))
    b = hash_order(make_split(60, 40, order="shuffled", seed=5))
    assert rows_of(a) == rows_of(b)


def test_check_splits_missing_label_is_an_error() -> None:
    splits = {"train": make_split(10, 10), "val": make_split(3, 3), "test": make_split(0, 8)}
    with pytest.raises(DataError, match=r"'test' has no rows with label 0"):
        check_splits(splits)


def test_check_splits_empty_split_is_an_error() -> None:
    with pytest.raises(DataError, match=r"'val' is empty"):
        check_splits({"train": make_split(10, 10), "val": RawSplit(), "test": make_split(4, 4)})


def test_check_splits_imbalance_is_a_warning_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    splits = {"train": make_split(90, 10), "val": make_split(9, 1), "test": make_split(50, 50)}
    warnings = check_splits(splits)
    assert len(warnings) == 2
    assert any("'train'" in w and "imbalanced" in w for w in warnings)
    assert any("'val'" in w for w in warnings)
    assert not any("'test'" in w for w in warnings)
    assert check_splits({"train": make_split(50, 50)}) == []


def test_label_counts_reports_both_labels() -> None:
    assert label_counts([1, 1, 1]) == {"0": 0, "1": 3}
    assert label_counts([0, 1, 0]) == {"0": 2, "1": 1}
