"""Check that a corpus is fit to train on, and say exactly where it is not.

Two gates: `check_rows` on the raw rows (types and values, naming the file and
row at fault) before cleaning, and `check_splits` on the final splits (non-empty,
both labels present, balance) before anything is written.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import TYPE_CHECKING

from pipelines.core import console
from pipelines.core.errors import DataError

if TYPE_CHECKING:  # sources runs check_rows itself, so it cannot be imported here at run time
    from pipelines.data.corpus import RawCorpus

LABELS = (0, 1)
log = logging.getLogger(__name__)


def short_repr(value: object, limit: int = 80) -> str:
    """repr() cut to `limit` characters: a 200k-character value must not become the error line."""
    shown = repr(value)
    return shown if len(shown) <= limit else f"{shown[:limit]}... ({len(shown)} characters)"


def check_rows(corpus: RawCorpus) -> None:
    """Every text a string and every label 0 or 1; the first bad row is named."""
    for split_name, split in corpus.items():
        for text, label, origin in zip(split.texts, split.labels, split.origins):
            if not isinstance(text, str):
                raise DataError(f"text must be a string, found {type(text).__name__} ({short_repr(text)})", origin)
            # bool is an int subclass; True/False labels usually mean a mislabelled column
            if isinstance(label, bool) or label not in LABELS:
                raise DataError(f"label must be 0 or 1, found {short_repr(label)}", origin)


def label_counts(labels: list[int]) -> dict[str, int]:
    counts = Counter(labels)
    return {str(label): counts.get(label, 0) for label in LABELS}


def check_splits(splits: RawCorpus, min_class_fraction: float = 0.2, where: str | None = None) -> list[str]:
    """Every split non-empty with both labels; returns warnings for imbalance.

    Imbalance is a warning, not an error: a skewed dataset is legal, but the
    user should know that accuracy then needs a baseline to mean anything.
    `where` (the source) leads an error's message.
    """
    warnings: list[str] = []
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(
                f"split {name!r} is empty after cleaning and splitting: too few usable reviews "
                "(empty and duplicate ones are dropped; see the cleaning report)",
                where,
            )
        counts = label_counts(split.labels)
        missing = [label for label, count in counts.items() if count == 0]
        if missing:
            raise DataError(f"split {name!r} has no rows with label {', '.join(missing)} ({counts})", where)
        minority = min(counts.values()) / len(split)
        if minority < min_class_fraction:
            warnings.append(f"split {name!r} is imbalanced: {counts} (minority {minority:.1%})")
    for warning in warnings:
        log.warning(warning)
        console.warn(warning)
    return warnings
