"""De-duplicate a corpus and clean every review, counting everything that was dropped.

Nothing is dropped silently: every removal is a number in the CleaningReport,
which goes into the dataset manifest and onto the console.

The official test split stays whole: published IMDB accuracies are measured on all
25,000 test reviews, duplicates included, so duplicates inside test are counted,
never removed, and our figures compare with published ones. Train (and val, carved
out of it later) loses its duplicates and every review that test also holds.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

from pipelines.data.corpus import RawCorpus, RawSplit
from pipelines.text.cleaning import WHITESPACE, clean_text

# Splits whose rows are an official benchmark: cleaned, but never de-duplicated.
WHOLE_SPLITS = frozenset({"test"})


@dataclass
class SplitReport:
    rows_in: int = 0
    markup_removed: int = 0
    empty_dropped: int = 0
    # A de-duplicated split (train) drops these; a whole split (test) keeps them and
    # counts them in the *_kept fields instead, so exactly one of each pair is non-zero.
    duplicates_dropped: int = 0  # extra copies of a text (the first copy is kept)
    conflicting_label_dropped: int = 0  # every copy of a text seen with both labels
    duplicates_kept: int = 0
    conflicting_label_kept: int = 0
    rows_out: int = 0

    def summary(self, name: str) -> str:
        head = (
            f"{name}: {self.rows_in} in -> {self.rows_out} out "
            f"(markup cleaned {self.markup_removed}, empty {self.empty_dropped}, "
        )
        if name in WHOLE_SPLITS:
            return head + (
                f"duplicates kept {self.duplicates_kept}, conflicting labels kept {self.conflicting_label_kept}"
                f": the official {name} set stays whole)"
            )
        return head + (
            f"duplicates dropped {self.duplicates_dropped}, "
            f"conflicting labels dropped {self.conflicting_label_dropped})"
        )


@dataclass
class CleaningReport:
    splits: dict[str, SplitReport] = field(default_factory=dict)
    # Reviews present in both train and test (a known IMDB issue) leak test answers
    # into training; they are removed from train only.
    train_test_overlap_dropped: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [report.summary(name) for name, report in self.splits.items()]
        lines.append(f"train reviews also in test, dropped from train: {self.train_test_overlap_dropped}")
        return "\n".join(lines)


def _clean_split(raw: RawSplit, report: SplitReport) -> RawSplit:
    cleaned = RawSplit()
    report.rows_in = len(raw)
    for text, label, origin in zip(raw.texts, raw.labels, raw.origins):
        clean = clean_text(text)
        if clean != WHITESPACE.sub(" ", text).strip():
            report.markup_removed += 1
        if not clean:
            report.empty_dropped += 1
            continue
        cleaned.add(clean, label, origin)
    return cleaned


def _deduplicate(split: RawSplit, report: SplitReport, *, keep: bool = False) -> RawSplit:
    """Keep the first copy of each text; drop every copy of a text seen with two labels.

    With `keep` (an official test split) nothing is dropped: the same rows are
    counted, in duplicates_kept and conflicting_label_kept, and every row stays.
    """
    labels_of: dict[str, set[int]] = defaultdict(set)
    for text, label in zip(split.texts, split.labels):
        labels_of[text].add(label)
    kept = RawSplit()
    seen: set[str] = set()
    for text, label, origin in zip(split.texts, split.labels, split.origins):
        if len(labels_of[text]) > 1:
            if not keep:
                report.conflicting_label_dropped += 1
                continue
            report.conflicting_label_kept += 1
        elif text in seen:
            if not keep:
                report.duplicates_dropped += 1
                continue
            report.duplicates_kept += 1
        seen.add(text)
        kept.add(text, label, origin)
    return kept


def clean_corpus(raw: RawCorpus) -> tuple[RawCorpus, CleaningReport]:
    """Clean every split, de-duplicate train (test only counts its duplicates), then drop from train what test holds."""
    report = CleaningReport()
    cleaned: RawCorpus = {}
    for name, split in raw.items():
        split_report = report.splits.setdefault(name, SplitReport())
        cleaned[name] = _deduplicate(_clean_split(split, split_report), split_report, keep=name in WHOLE_SPLITS)
    if "train" in cleaned and "test" in cleaned:
        test_texts = set(cleaned["test"].texts)
        train = RawSplit()
        for text, label, origin in zip(cleaned["train"].texts, cleaned["train"].labels, cleaned["train"].origins):
            if text in test_texts:
                report.train_test_overlap_dropped += 1
            else:
                train.add(text, label, origin)
        cleaned["train"] = train
    for name, split in cleaned.items():
        report.splits[name].rows_out = len(split)
    return cleaned, report
