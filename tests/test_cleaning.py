"""Tests for pipelines.data.cleaning: text normalisation and corpus de-duplication, with counts."""

from __future__ import annotations

import pytest

from pipelines.data.cleaning import CleaningReport, clean_corpus
from pipelines.data.corpus import RawSplit
from pipelines.text.cleaning import clean_text

pytestmark = pytest.mark.timeout(60)


def split_of(*rows: tuple[str, int]) -> RawSplit:
    split = RawSplit()
    for i, (text, label) in enumerate(rows):
        split.add(text, label, f"origin-{i}")
    return split


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # IMDB's paragraph breaks and inline markup
        ("Great movie.<br /><br />Loved it.", "Great movie. Loved it."),
        ("Great<br/>movie<BR>again", "Great movie again"),
        ('<i>Italic</i> and <b>bold</b> and <a href="http://x.y/z">a link</a>.', "Italic and bold and a link ."),
        # comparison signs that are not tags survive
        ("a < b and c > d", "a < b and c > d"),
        ("I give it <3 and 5 > 4", "I give it <3 and 5 > 4"),
        # entities decoded
        ("Tom &amp; Jerry said &quot;hi&quot; &#39;twice&#39; &eacute;", "Tom & Jerry said \"hi\" 'twice' \u00e9"),
        # NFKC: full-width letters and digits, ligatures, non-breaking spaces
        ("\uff27\uff32\uff25\uff21\uff34 \uff46\uff49\uff4c\uff4d \uff11\uff10/\uff11\uff10", "GREAT film 10/10"),
        ("a \ufb01ne \ufb02ick", "a fine flick"),
        ("caf\u0065\u0301", "caf\u00e9"),
        ("one\u00a0two\u3000three", "one two three"),
        # zero-width characters and BOM vanish (inside words too)
        ("\ufeffwon\u200bder\u200cful\u200d movie\u2060", "wonderful movie"),
        # whitespace collapsed and stripped
        ("  lots \t of\n\n\r\n   space  ", "lots of space"),
        ("<br /><br />", ""),
        ("\u200b \u200b", ""),
    ],
)
def test_clean_text(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


def test_clean_text_is_idempotent() -> None:
    raw = "<i>Caf\u00e9</i> &amp; \ufb01lm<br /><br />\uff21  \u200bend"
    once = clean_text(raw)
    assert clean_text(once) == once


def test_clean_corpus_drops_and_counts_everything() -> None:
    train = split_of(
        ("A fine film.", 1),  # kept
        ("A fine<br /><br />film.", 1),  # same text after cleaning: duplicate
        ("A fine film.", 1),  # exact duplicate
        ("<br /><br />", 0),  # empty after cleaning
        ("   \u200b  ", 1),  # empty after cleaning
        ("Mixed feelings.", 0),  # same text with two labels: every copy dropped
        ("Mixed   feelings.", 1),
        ("Mixed feelings.", 0),
        ("Seen in test too.", 0),  # in test as well: removed from train only
        ("Seen <i>in</i> test too.", 0),  # duplicate of the row above
        ("Train only, negative.", 0),  # kept
    )
    test = split_of(
        ("Seen in test too.", 0),  # kept in test
        ("Test review &amp; more.", 1),  # kept, decoded
        ("Test review & more.", 1),  # duplicate once decoded: kept too, and counted
        ("", 0),  # empty
    )
    cleaned, report = clean_corpus({"train": train, "test": test})

    assert isinstance(report, CleaningReport)
    assert cleaned["train"].texts == ["A fine film.", "Train only, negative."]
    assert cleaned["train"].labels == [1, 0]
    # the first copy is the one kept, with its own origin
    assert cleaned["train"].origins == ["origin-0", "origin-10"]
    # test stays whole (cleaned, but every non-empty row kept, in order)
    assert cleaned["test"].texts == ["Seen in test too.", "Test review & more.", "Test review & more."]
    assert cleaned["test"].labels == [0, 1, 1]
    assert cleaned["test"].origins == ["origin-0", "origin-1", "origin-2"]

    tr, te = report.splits["train"], report.splits["test"]
    assert (tr.rows_in, tr.empty_dropped, tr.duplicates_dropped, tr.conflicting_label_dropped) == (11, 2, 3, 3)
    assert (tr.duplicates_kept, tr.conflicting_label_kept) == (0, 0)
    assert report.train_test_overlap_dropped == 1
    assert tr.rows_out == 2
    assert (te.rows_in, te.empty_dropped, te.duplicates_dropped, te.conflicting_label_dropped, te.rows_out) == (4, 1, 0, 0, 3)
    assert (te.duplicates_kept, te.conflicting_label_kept) == (1, 0)
    # nothing vanishes without a number: in = out + every counted drop
    assert tr.rows_in == (
        tr.rows_out + tr.empty_dropped + tr.duplicates_dropped + tr.conflicting_label_dropped
        + report.train_test_overlap_dropped
    )
    assert te.rows_in == te.rows_out + te.empty_dropped

    as_dict = report.as_dict()
    assert as_dict["train_test_overlap_dropped"] == 1
    assert as_dict["splits"]["train"]["duplicates_dropped"] == 3
    assert as_dict["splits"]["test"]["duplicates_dropped"] == 0
    assert as_dict["splits"]["test"]["duplicates_kept"] == 1
    summary = report.summary()
    assert "train: 11 in -> 2 out" in summary
    assert "duplicates dropped 3, conflicting labels dropped 3" in summary
    assert "test: 4 in -> 3 out" in summary
    assert "duplicates kept 1, conflicting labels kept 0: the official test set stays whole" in summary
    assert "dropped from train: 1" in summary


def test_test_split_keeps_its_duplicates_and_conflicting_labels_and_counts_them() -> None:
    """Published IMDB accuracies are on all 25,000 test reviews: test is never de-duplicated."""
    test = split_of(
        ("Loved it.", 1),
        ("Hated it.", 0),
        ("Loved<br />it.", 1),  # a duplicate once cleaned
        ("Loved it.", 1),  # an exact duplicate
        ("So-so.", 1),  # the same text with both labels: both rows kept, as the official set has them
        ("So-so.", 0),
        ("Hated&nbsp;it.", 0),  # NFKC turns the non-breaking space into a space: a duplicate
    )
    cleaned, report = clean_corpus({"train": split_of(("Train pos.", 1), ("Train neg.", 0)), "test": test})

    assert cleaned["test"].texts == ["Loved it.", "Hated it.", "Loved it.", "Loved it.", "So-so.", "So-so.", "Hated it."]
    assert cleaned["test"].labels == [1, 0, 1, 1, 1, 0, 0]
    assert cleaned["test"].origins == [f"origin-{i}" for i in range(7)]
    te = report.splits["test"]
    assert (te.rows_in, te.rows_out) == (7, 7)
    assert (te.duplicates_kept, te.conflicting_label_kept) == (3, 2)
    assert (te.duplicates_dropped, te.conflicting_label_dropped, te.empty_dropped) == (0, 0, 0)
    assert "test: 7 in -> 7 out" in report.summary()
    assert "duplicates kept 3, conflicting labels kept 2: the official test set stays whole" in report.summary()


def test_train_still_loses_duplicates_and_overlap_when_test_has_duplicates() -> None:
    train = split_of(
        ("Shared review.", 1),  # in test (twice there): dropped from train
        ("Train dup.", 0),
        ("Train dup.", 0),  # duplicate: dropped
        ("Both ways.", 1),  # conflicting labels in train: every copy dropped
        ("Both ways.", 0),
        ("Train only.", 1),
    )
    test = split_of(("Shared review.", 1), ("Shared review.", 1), ("Test neg.", 0))
    cleaned, report = clean_corpus({"train": train, "test": test})

    assert cleaned["train"].texts == ["Train dup.", "Train only."]
    assert cleaned["test"].texts == ["Shared review.", "Shared review.", "Test neg."]
    tr, te = report.splits["train"], report.splits["test"]
    assert (tr.duplicates_dropped, tr.conflicting_label_dropped, tr.rows_out) == (1, 2, 2)
    assert (tr.duplicates_kept, tr.conflicting_label_kept) == (0, 0)
    assert report.train_test_overlap_dropped == 1
    assert (te.duplicates_kept, te.rows_out) == (1, 3)
    assert not set(cleaned["train"].texts) & set(cleaned["test"].texts)


def test_overlap_is_removed_from_train_not_test_even_with_other_markup() -> None:
    train = split_of(("Same<br />review", 1), ("Other review", 0), ("Third review", 1))
    test = split_of(("Same review", 1), ("Test neg", 0))
    cleaned, report = clean_corpus({"train": train, "test": test})
    assert "Same review" not in cleaned["train"].texts
    assert "Same review" in cleaned["test"].texts
    assert report.train_test_overlap_dropped == 1
    assert report.splits["test"].rows_out == 2


def test_clean_corpus_without_drops_keeps_order_and_labels() -> None:
    rows = [(f"review number {i}", i % 2) for i in range(10)]
    cleaned, report = clean_corpus({"train": split_of(*rows), "test": split_of(("a test", 0), ("b test", 1))})
    assert cleaned["train"].texts == [t for t, _ in rows]
    assert cleaned["train"].labels == [lab for _, lab in rows]
    assert report.train_test_overlap_dropped == 0
    assert report.splits["train"].rows_out == 10
